"""Stage 6: warp every section by its global field and write the aligned OME-Zarr.

Each section is rendered in output tiles (one shard each), each tile in row strips: the field is upsampled for
the strip only, only the part of the raw section the strip pulls from is read, and the tile is written with its
pyramid before the next, so memory is bounded by the tile's pixels and a strip's temporaries, not by the section.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from emalign.device import resolve_device
from emalign.fields import resample, sample
from emalign.io import Stack, check_chunk, read_tile
from emalign.pipeline.store import Workspace

RegionReader = Callable[[Stack, int, tuple[slice, slice]], np.ndarray]
"""``read(stack, z, (rows, cols))``: that part of section ``z`` as float32."""


def read_region(stack: Stack, z: int, region: tuple[slice, slice]) -> np.ndarray:
    """Part ``region`` of section ``z`` as read (no finiteness check), float32."""
    return check_chunk(stack, z, require_finite=False, region=region).astype(np.float32)


RENDER_PIXELS = 1 << 22
"""Output pixels :func:`render_region` warps at once: a larger region goes in row strips of about this many (the
warp's temporaries are some tens of bytes per pixel, so an output tile of one shard would otherwise take a GiB)."""


def render_region(
    stack: Stack,
    z: int,
    field: np.ndarray,
    stride: int,
    origin: tuple[int, int],
    shape: tuple[int, int],
    read: RegionReader = read_region,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The ``shape`` region at ``origin`` (y0, x0) of section ``z`` pulled by ``field (2, gy, gx)``, float32;
    the field's upsampling and the warp run on ``device``, in row strips of :data:`RENDER_PIXELS` at most.

    Only the part of the raw section each strip pulls from is read (by ``read``); pixels pulled from outside are 0.
    """
    height, width = stack.shape[1:]

    def strip(y0: int, rows: int) -> np.ndarray:
        """Rows ``y0..y0 + rows`` (section coordinates) of the region."""
        x0, size = origin[1], (rows, shape[1])
        coords = resample(field, stride, 1, size, origin=(y0, x0), device=device)
        coords[0] += np.arange(y0, y0 + rows, dtype=np.float32)[:, None]
        coords[1] += np.arange(x0, x0 + shape[1], dtype=np.float32)[None, :]
        lo = np.floor(coords.reshape(2, -1).min(1)).astype(int) - 1
        hi = np.ceil(coords.reshape(2, -1).max(1)).astype(int) + 2
        lo, hi = np.maximum(lo, 0), np.minimum(hi, (height, width))
        if np.any(hi <= lo):
            return np.zeros(size, np.float32)
        source = read(stack, z, (slice(lo[0], hi[0]), slice(lo[1], hi[1])))
        coords -= lo.reshape(2, 1, 1).astype(np.float32)
        return sample(source, coords, device=device)

    step = max(1, RENDER_PIXELS // shape[1])
    out = np.empty(shape, np.float32)
    for top in range(0, shape[0], step):
        out[top : top + step] = strip(origin[0] + top, min(step, shape[0] - top))
    return out


def render_block(ws: Workspace, stack: Stack, index: int, device: str = "auto") -> None:
    """Render and write the sections of block ``index`` of the full-resolution ``stack`` not yet written (fields
    scaled from the working resolution), tile by tile (:meth:`emalign.io.OmeZarrWriter.write_tiled`: one shard
    per tile, so no two tasks write the same file), warped on ``device``; flagged ones pass through unchanged."""
    dev = resolve_device(device)
    start, stop = ws.plan.blocks()[index]
    excluded = ws.excluded()
    done = np.asarray(ws.writer.done[start:stop], bool)  # this block's markers only: one small read per section
    fields, factor = ws.array("fields/global"), ws.factor
    for z in range(start, stop):
        if done[z - start]:
            continue
        if excluded[z]:
            ws.writer.write_tiled(z, functools.partial(read_tile, stack, z))
        else:
            field, stride = factor * np.asarray(fields[z]), factor * ws.params.stride
            ws.writer.write_tiled(z, functools.partial(render_region, stack, z, field, stride, device=dev))
