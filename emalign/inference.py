"""Running a serial network on windows of sections: batching, xy tiling, devices.

A window is ``(D, Y, X)`` with ``D = 2K + 1`` sections, the moving one in the middle;
zeros are no data. Large sections are cut into overlapping xy tiles whose fields are
blended with weights that fall to zero at tile borders, so tiles leave no seams.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
import torch

from emalign.device import autocast, reuse_freed_memory
from emalign.models.faemreg import FAEMReg, normalize_sections
from emalign.tiling import taper, tile_starts

T = TypeVar("T")


class WindowSource(Protocol):
    """What :func:`predict_windows` reads windows from: a shape ``(B, D, Y, X)`` and slices of it as arrays."""

    shape: tuple[int, ...]

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray: ...


def _inside(inner: slice, outer: slice) -> bool:
    return outer.start <= inner.start and inner.stop <= outer.stop


def tiles(
    shape: tuple[int, int], tile: int, halo: int, within: tuple[slice, slice] | None = None
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Overlapping xy tiles covering ``shape`` with their blending weights ``(ty, tx)``; only those inside
    ``within`` (rows, cols) if given."""
    ys, xs = tile_starts(shape[0], tile, 2 * halo), tile_starts(shape[1], tile, 2 * halo)
    for y0 in ys:
        for x0 in xs:
            sy = slice(y0, min(y0 + tile, shape[0]))
            sx = slice(x0, min(x0 + tile, shape[1]))
            if within and not (_inside(sy, within[0]) and _inside(sx, within[1])):
                continue
            yield sy, sx, np.outer(taper(sy.start, sy.stop, shape[0], halo), taper(sx.start, sx.stop, shape[1], halo))


def tile_span(length: int, tile: int, halo: int, lo: int, hi: int) -> tuple[int, int]:
    """``[start, stop)`` covered by the tiles of an axis of ``length`` (as :func:`tiles` cuts it) that overlap
    ``[lo, hi)``: a region holding every tile that contributes to a pixel of ``[lo, hi)``."""
    starts = [a for a in tile_starts(length, tile, 2 * halo) if a < hi and a + tile > lo]
    return starts[0], min(starts[-1] + tile, length)


def _region_tiles(
    shape: tuple[int, int], tile: int, halo: int, frame: tuple[tuple[int, int], tuple[int, int]] | None
) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """The tiles of ``shape`` (a region), or with ``frame = (origin, section shape)`` the tiles of the whole
    section that lie inside the region at ``origin``, moved into the region, with the section's weights."""
    if frame is None:
        yield from tiles(shape, tile, halo)
        return
    (y0, x0), section = frame
    within = (slice(y0, y0 + shape[0]), slice(x0, x0 + shape[1]))
    for sy, sx, weight in tiles(section, tile, halo, within):
        yield slice(sy.start - y0, sy.stop - y0), slice(sx.start - x0, sx.stop - x0), weight


_GPU = threading.Lock()
"""Held by a network pass on the GPU: the threads of a process (one GPU each) take turns on it, so its memory holds
one pass's activations, while the other threads read and warp their next windows on the CPU."""


def _ahead(load: Callable[[T], torch.Tensor], items: list[T], prefetch: bool) -> Iterator[tuple[T, torch.Tensor]]:
    """``(item, load(item))`` for each item; with ``prefetch`` the next item is loaded in a thread meanwhile."""
    if not prefetch:
        yield from ((item, load(item)) for item in items)
        return
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, items[0]) if items else None
        for position, item in enumerate(items):
            loaded = pending.result()
            if position + 1 < len(items):
                pending = pool.submit(load, items[position + 1])
            yield item, loaded


@torch.inference_mode()
def predict_windows(
    model: FAEMReg,
    windows: np.ndarray | WindowSource,
    device: torch.device,
    tile: int = 512,
    halo: int = 32,
    batch: int = 2,
    frame: tuple[tuple[int, int], tuple[int, int]] | None = None,
    prefetch: bool | None = None,
) -> np.ndarray:
    """Fields of the moving sections of ``windows (B, D, Y, X)`` -> ``(B, 2, Y, X)`` float32.

    ``windows``: an array, or an object with its ``shape`` that gives ``windows[b0:b1, :, rows, cols]`` as one
    (e.g. windows stacked one network tile at a time, so that they are never held whole).

    Pull fields in full-resolution pixels: ``warp(window[:, K], field)`` lines up with the
    window's references. Sections larger than ``tile`` are processed in overlapping tiles.
    ``frame = ((y0, x0), (height, width))``: the windows are the region at ``(y0, x0)`` of sections of that
    shape, tiled as the whole sections are; where every tile covering a pixel lies inside the region
    (:func:`tile_span`), its field equals the whole sections' (the region must be covered by such tiles).

    On a GPU (``prefetch`` None: there, not on the CPU) the next batch of windows is read while the network runs,
    into pinned memory that is copied to the GPU without blocking; passes on the GPU take turns (:data:`_GPU`).
    """
    gpu = device.type == "cuda"
    if not gpu:
        reuse_freed_memory()
    count, _, height, width = windows.shape
    out = np.zeros((count, 2, height, width), np.float32)
    norm = np.zeros((height, width), np.float32)
    steps = []
    for sy, sx, weight in _region_tiles((height, width), tile, halo, frame):
        norm[sy, sx] += weight
        steps += [(slice(b0, b0 + batch), sy, sx, weight) for b0 in range(0, count, batch)]

    def load(step: tuple[slice, slice, slice, np.ndarray]) -> torch.Tensor:
        chunk = torch.from_numpy(np.ascontiguousarray(windows[step[0], :, step[1], step[2]], np.float32))
        return chunk.pin_memory() if gpu else chunk

    for (rows, sy, sx, weight), chunk in _ahead(load, steps, gpu if prefetch is None else prefetch):
        with _GPU if gpu else contextlib.nullcontext(), autocast(device):
            field = model(normalize_sections(chunk.to(device, non_blocking=gpu))).float().cpu().numpy()
        out[rows, :, sy, sx] += field * weight
    return np.divide(out, norm, out=out, where=norm > 0)  # 0 where no tile lies (a region's edge)


__all__ = ["predict_windows", "tile_span", "tiles"]
