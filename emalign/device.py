"""Device choice and mixed precision, in one place (CPU by default, CUDA when present)."""

from __future__ import annotations

import contextlib

import torch

from emalign.errors import EmalignError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:N"`` as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmalignError(f"--device {device}: CUDA is not available on this machine (use auto or cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise EmalignError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision (bfloat16) on CUDA; a no-op on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
