"""Device choice and mixed precision, in one place (CPU by default, CUDA when present)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
from typing import TYPE_CHECKING

from emalign.errors import EmalignError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` as given."""
    import torch  # here, not at the top: the CLI imports this module for reuse_freed_memory before any torch work

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmalignError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise EmalignError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The GPU's product name, or ``"CPU"``."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def describe(device: torch.device) -> str:
    """One line naming ``device`` and the software that drives it, for benchmark tables."""
    import os

    import torch

    return f"{device_name(device)} and {os.cpu_count()} CPU cores; torch {torch.__version__}, CUDA {torch.version.cuda}"


def worker_device(device: str, worker: str | int | None, gpus: int) -> str:
    """The device of one dask worker process: where a machine shows it several GPUs and ``device`` names none
    (``auto`` or ``cuda``), the worker whose name ends in the number ``n`` takes ``cuda:{n % gpus}``, so that a
    ``processes:N`` cluster with N the number of GPUs runs one process per GPU; otherwise ``device`` as given."""
    number = re.search(r"(\d+)$", str(worker)) if worker is not None else None
    if gpus < 2 or device not in ("auto", "cuda") or number is None:
        return device
    return f"cuda:{int(number.group(1)) % gpus}"


def task_device(device: str) -> str:
    """:func:`worker_device` of the dask worker running this task (``device`` itself outside a worker, or with one
    GPU or none)."""
    import torch

    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if gpus < 2:
        return device
    try:
        from distributed import get_worker

        worker = get_worker().name
    except (ImportError, ValueError):
        return device
    return worker_device(device, worker, gpus)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision (bfloat16) on CUDA; a no-op on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (it has ``mallopt`` and ``malloc_trim``); None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist, or this is no glibc)
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse rather than hand it back to the OS after every free.

    A CPU forward pass allocates and frees tens of MB per layer; glibc serves blocks that large
    with fresh ``mmap`` calls (always, in the per-thread arenas), and the page faults of touching
    them again cost about a third of the pass. One arena with raised mmap and trim thresholds
    keeps them on the heap, at the price of a heap that never shrinks by itself
    (:func:`release_freed_memory` after each task does that). Call it before worker threads start (threads
    keep the arena they first used). Runs once per process; False without glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        (_M_ARENA_MAX, 1),
        (_M_MMAP_THRESHOLD, 1 << 30),
        (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, 256 << 20),
    )
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def release_freed_memory() -> None:
    """Hand the free pages of glibc's heap back to the OS (``malloc_trim``), so that what one task freed does not
    stay resident, fragmented, through the next tasks and stages; a no-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
