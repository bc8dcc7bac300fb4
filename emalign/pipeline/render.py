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
from emalign.io import Stack, check_chunk
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
    rows = max(1, RENDER_PIXELS // shape[1])
    out = np.empty(shape, np.float32)
    for top in range(0, shape[0], rows):
        strip = (min(rows, shape[0] - top), shape[1])
        out[top : top + strip[0]] = _render_strip(
            stack, z, field, stride, (origin[0] + top, origin[1]), strip, read, device
        )
    return out


def _render_strip(
    stack: Stack,
    z: int,
    field: np.ndarray,
    stride: int,
    origin: tuple[int, int],
    shape: tuple[int, int],
    read: RegionReader,
    device: torch.device | str,
) -> np.ndarray:
    """:func:`render_region` of one strip, at once."""
    height, width = stack.shape[1:]
    y0, x0 = origin
    coords = resample(field, stride, 1, shape, origin=origin, device=device)
    coords[0] += np.arange(y0, y0 + shape[0], dtype=np.float32)[:, None]
    coords[1] += np.arange(x0, x0 + shape[1], dtype=np.float32)[None, :]
    lo = np.floor(coords.reshape(2, -1).min(1)).astype(int) - 1
    hi = np.ceil(coords.reshape(2, -1).max(1)).astype(int) + 2
    lo, hi = np.maximum(lo, 0), np.minimum(hi, (height, width))
    if np.any(hi <= lo):
        return np.zeros(shape, np.float32)
    region = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    source = read(stack, z, region)
    coords -= lo.reshape(2, 1, 1).astype(np.float32)
    return sample(source, coords, device=device)


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
            ws.writer.write_tiled(z, functools.partial(_raw_tile, stack, z))
        else:
            field, stride = factor * np.asarray(fields[z]), factor * ws.params.stride
            ws.writer.write_tiled(z, functools.partial(render_region, stack, z, field, stride, device=dev))


def _raw_tile(stack: Stack, z: int, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """The ``shape`` region at ``origin`` of section ``z`` as read (a flagged section, passed through)."""
    region = (slice(origin[0], origin[0] + shape[0]), slice(origin[1], origin[1] + shape[1]))
    return check_chunk(stack, z, require_finite=False, region=region)
