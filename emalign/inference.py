"""Running a serial network on windows of sections: batching, xy tiling, devices.

A window is ``(D, Y, X)`` with ``D = 2K + 1`` sections, the moving one in the middle;
zeros are no data. Large sections are cut into overlapping xy tiles whose fields are
blended with weights that fall to zero at tile borders, so tiles leave no seams.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from emalign.device import autocast, reuse_freed_memory
from emalign.models.faemreg import FAEMReg, normalize_sections


def _tile_starts(length: int, tile: int, halo: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - 2 * halo
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def _taper(length: int, halo: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1D blending weight: ramps over ``halo`` pixels at inner tile borders, 1 elsewhere."""
    weight = np.ones(length, np.float32)
    ramp = (np.arange(halo, dtype=np.float32) + 0.5) / halo if halo else np.zeros(0, np.float32)
    if not at_start and halo:
        weight[:halo] = ramp
    if not at_end and halo:
        weight[-halo:] = ramp[::-1]
    return weight


def tiles(shape: tuple[int, int], tile: int, halo: int) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """Overlapping xy tiles covering ``shape`` with their blending weights ``(ty, tx)``."""
    ys, xs = _tile_starts(shape[0], tile, halo), _tile_starts(shape[1], tile, halo)
    for y0 in ys:
        for x0 in xs:
            sy = slice(y0, min(y0 + tile, shape[0]))
            sx = slice(x0, min(x0 + tile, shape[1]))
            wy = _taper(sy.stop - sy.start, halo, y0 == ys[0], y0 == ys[-1])
            wx = _taper(sx.stop - sx.start, halo, x0 == xs[0], x0 == xs[-1])
            yield sy, sx, np.outer(wy, wx)


@torch.inference_mode()
def predict_windows(
    model: FAEMReg,
    windows: np.ndarray,
    device: torch.device,
    tile: int = 512,
    halo: int = 64,
    batch: int = 2,
) -> np.ndarray:
    """Fields of the moving sections of ``windows (B, D, Y, X)`` -> ``(B, 2, Y, X)`` float32.

    Pull fields in full-resolution pixels: ``warp(window[:, K], field)`` lines up with the
    window's references. Sections larger than ``tile`` are processed in overlapping tiles.
    """
    if device.type == "cpu":
        reuse_freed_memory()
    count, _, height, width = windows.shape
    out = np.zeros((count, 2, height, width), np.float32)
    norm = np.zeros((height, width), np.float32)
    for sy, sx, weight in tiles((height, width), tile, halo):
        norm[sy, sx] += weight
        for b0 in range(0, count, batch):
            chunk = torch.from_numpy(np.ascontiguousarray(windows[b0 : b0 + batch, :, sy, sx], np.float32))
            with autocast(device):
                field = model(normalize_sections(chunk.to(device))).float().cpu().numpy()
            out[b0 : b0 + batch, :, sy, sx] += field * weight
    return out / norm


__all__ = ["predict_windows", "tiles"]
