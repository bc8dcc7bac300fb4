"""Registration of whole volumes: patch-wise network inference with blended overlaps, chunked warping, outputs.

* :func:`predict_field`: the network runs on overlapping patches (sizes padded to its divisor);
  each patch's field is weighted by a window that ramps linearly over the overlap on faces shared
  with a neighbour (1 on the volume's own faces), and the weighted fields are normalised by the sum
  of the weights. The weights form a partition of unity, so the field has no seams.
* :func:`warp_volume`: pull-warps a (possibly lazy, dask/Zarr) volume chunk by chunk, reading only
  the source region each chunk samples from.
* :func:`register_volumes`: fixed + moving arrays -> field and warped moving (in memory);
  :func:`register_files`: TIFF/Zarr paths -> OME-Zarr output with the field and provenance.

Conventions: arrays ``(Z, Y, X)``; the field ``(3, Z, Y, X)`` float32 lives on the fixed grid, in
voxels, channels ``(dz, dy, dx)``: ``warped(p) = moving(p + u(p))`` (:mod:`emalign.fields`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from emalign import fields, volumetric
from emalign.device import autocast, resolve_device
from emalign.errors import EmalignError
from emalign.tiling import taper, tile_starts
from emalign.volumetric.affine import affine_register
from emalign.volumetric.common import VolumeNet
from emalign.volumetric.data import intensity_stats, normalise

PATCH = 96
OVERLAP = 32
CHUNK = 64


def tiles(shape: tuple[int, ...], patch: tuple[int, ...], overlap: int) -> Iterator[tuple[slice, ...]]:
    """The patches (tuples of slices) of :func:`predict_field`, clipped to the volume."""
    starts = [tile_starts(n, p, overlap) for n, p in zip(shape, patch, strict=True)]
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                yield tuple(slice(s, min(s + p, n)) for s, p, n in zip((z, y, x), patch, shape, strict=True))


def _padded(block: np.ndarray, divisor: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(Z, Y, X)`` -> ``(1, 1, Z', Y', X')`` replicate-padded to multiples of ``divisor`` (and the original size)."""
    size = block.shape
    target = [max(divisor, int(math.ceil(n / divisor)) * divisor) for n in size]
    t = torch.from_numpy(np.ascontiguousarray(block, np.float32))[None, None]
    pad = []
    for n, m in zip(reversed(size), reversed(target), strict=True):
        pad += [0, m - n]
    if any(pad):
        t = F.pad(t, pad, mode="replicate")
    return t, size


@dataclass
class AffinePrealignment:
    """An affine pull map ``u(p) = A p + b - p`` (voxels; ``matrix = [A | b]``), from :func:`fit_affine`."""

    matrix: np.ndarray  # (3, 4)

    def field(self, box: tuple[slice, ...]) -> np.ndarray:
        """The field ``(3, *box shape)`` on a box of the fixed grid."""
        coords = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float64) for s in box], indexing="ij"))
        flat = coords.reshape(3, -1)
        mapped = self.matrix[:, :3] @ flat + self.matrix[:, 3:]
        return (mapped - flat).reshape(coords.shape).astype(np.float32)

    def compose_after(self, u: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
        """``compose(affine, u)`` on a box: warping by the result = by the affine map, then by ``u``."""
        w = self.matrix[:, :3] - np.eye(3)
        return (u + np.einsum("ij,j...->i...", w, u) + self.field(box)).astype(np.float32)


def fit_affine(fixed: Any, moving: Any, max_size: int = 96) -> AffinePrealignment:
    """Classical affine pre-alignment on copies downsampled to at most ``max_size`` voxels per axis."""
    step = max(1, int(math.ceil(max(fixed.shape) / max_size)))
    f = np.asarray(fixed[::step, ::step, ::step], np.float32)
    m = np.asarray(moving[tuple(slice(0, n * step, step) for n in f.shape)], np.float32)
    if m.shape != f.shape:
        m = np.pad(m, [(0, a - b) for a, b in zip(f.shape, m.shape, strict=True)], mode="edge")
    matrix, _ = affine_register(normalise(f), normalise(m))
    matrix = matrix.copy()
    matrix[:, 3] *= step  # the linear part is scale-free; the offset is in voxels of the subsampled grid
    return AffinePrealignment(matrix)


def warp_volume(
    moving: Any,
    field: np.ndarray,
    order: int = 1,
    cval: float = 0.0,
    chunk: int = CHUNK,
    origin: tuple[int, int, int] = (0, 0, 0),
    progress: bool = False,
) -> np.ndarray:
    """Pull-warp ``moving`` (numpy, dask or Zarr ``(Z, Y, X)``): ``out(p) = moving(origin + p + field(p))``.

    ``field`` ``(3, *out_shape)``, voxels; ``order`` 1 (trilinear) or 0 (nearest, for labels);
    outside ``moving`` gives ``cval``. Works chunk by chunk (``chunk`` voxels per side), reading
    only the bounding box each chunk samples. Returns float32 ``out_shape``.
    """
    out_shape = field.shape[1:]
    out = np.full(out_shape, cval, np.float32)
    boxes = list(tiles(out_shape, (chunk,) * 3, 0))
    for box in tqdm(boxes, desc="warp", disable=not progress):
        grid = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij"))
        coords = grid + field[(slice(None), *box)] + np.asarray(origin, np.float32).reshape(3, 1, 1, 1)
        lo = np.maximum(np.floor(coords.reshape(3, -1).min(1)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(coords.reshape(3, -1).max(1)).astype(int) + 2, moving.shape)
        if np.any(hi <= lo):
            continue
        region = np.asarray(moving[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], np.float32)
        local = (coords - lo.reshape(3, 1, 1, 1).astype(np.float32)).astype(np.float32)
        out[box] = fields.sample(region, local, order=order, cval=cval)
    return out


def predict_field(
    model: VolumeNet,
    fixed: Any,
    moving: Any,
    patch: int = PATCH,
    overlap: int = OVERLAP,
    device: str | torch.device = "auto",
    affine: AffinePrealignment | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The network's pull field ``(3, Z, Y, X)`` (voxels) from ``moving`` to ``fixed``, patch by patch.

    Args:
        model: a volumetric network (eval mode is set here).
        fixed, moving: ``(Z, Y, X)`` arrays (numpy, dask or Zarr; read patch by patch). ``moving``
            is read on the fixed grid (cropped or zero-padded when its shape differs).
        patch: patch side, voxels (rounded up to the model's divisor); volumes smaller than a
            patch run in one piece.
        overlap: voxels shared by neighbouring patches (blended with linear ramps).
        device: ``auto``, ``cpu`` or ``cuda`` (bfloat16 autocast on CUDA).
        affine: optional affine pre-alignment; the network then refines ``warp(moving, affine)``
            and the result is their composition.
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    shape = tuple(int(n) for n in fixed.shape)
    div = model.divisor
    patch = int(math.ceil(patch / div)) * div
    if overlap >= patch:
        raise EmalignError(f"overlap {overlap} must be smaller than the patch {patch}")
    sizes = tuple(min(patch, n) for n in shape)
    norm_f, norm_m = intensity_stats(fixed), intensity_stats(moving)
    total = np.zeros((3, *shape), np.float32)
    weight = np.zeros(shape, np.float32)
    boxes = list(tiles(shape, sizes, overlap))
    for box in tqdm(boxes, desc="register", disable=not progress):
        f = np.asarray(fixed[box], np.float32)
        if affine is not None:
            m = warp_volume(moving, affine.field(box), origin=tuple(s.start for s in box))
        else:
            m = _read_on_grid(moving, box)
        f, m = norm_f.apply(f), norm_m.apply(m)
        ft, size = _padded(f, div)
        mt, _ = _padded(m, div)
        with torch.no_grad(), autocast(dev):
            u = model(ft.to(dev), mt.to(dev)).field
        u = u.float()[0, :, : size[0], : size[1], : size[2]].cpu().numpy()
        if affine is not None:
            u = affine.compose_after(u, box)
        w = np.einsum(
            "i,j,k->ijk",
            *[taper(s.start, s.stop, n, overlap) for s, n in zip(box, shape, strict=True)],
        )
        total[(slice(None), *box)] += u * w
        weight[box] += w
    return total / weight


def _read_on_grid(volume: Any, box: tuple[slice, ...]) -> np.ndarray:
    """``volume[box]`` as float32, zero-padded where the box reaches past the volume."""
    clipped = tuple(slice(s.start, min(s.stop, n)) for s, n in zip(box, volume.shape, strict=True))
    block = np.asarray(volume[clipped], np.float32)
    want = tuple(s.stop - s.start for s in box)
    if block.shape != want:
        block = np.pad(block, [(0, w - b) for w, b in zip(want, block.shape, strict=True)])
    return block


@dataclass
class VolumeResult:
    """Result of :func:`register_volumes`: the pull field (fixed grid, voxels) and the warped moving volume."""

    field: np.ndarray
    warped: np.ndarray
    seconds: float


def register_volumes(
    fixed: Any,
    moving: Any,
    model: str | VolumeNet = volumetric.DEFAULT_MODEL,
    patch: int = PATCH,
    overlap: int = OVERLAP,
    device: str | torch.device = "auto",
    affine: bool = True,
    progress: bool = False,
) -> VolumeResult:
    """Register ``moving`` onto ``fixed`` (``(Z, Y, X)`` arrays) with a volumetric network.

    ``model``: a shipped name (``sdhnet-small``, ``rdn-small``, ``crd-small``), a ``.pt`` checkpoint
    or a network. ``affine``: classical affine pre-alignment first (the shipped models were trained
    on what it leaves: residual affine motion and the elastic part). Returns the field
    ``(3, Z, Y, X)`` and ``warped`` (float32, fixed's shape):
    ``warped(p) = moving(p + field(p))``.
    """
    start = time.perf_counter()
    net = volumetric.load(model) if isinstance(model, str | Path) else model
    prealign = fit_affine(fixed, moving) if affine else None
    field = predict_field(net, fixed, moving, patch, overlap, device, prealign, progress)
    warped = warp_volume(moving, field, progress=progress)
    return VolumeResult(field, warped, time.perf_counter() - start)


def _write_field(path: Path, field: np.ndarray, attrs: dict) -> None:
    """Write the field as a Zarr v3 array ``(3, Z, Y, X)`` float32 (like the NGFF 0.5 output it may sit in) with its
    conventions in ``attrs``."""
    import zarr

    from emalign.io import COMPRESSOR_V3

    array = zarr.create_array(
        store=str(path),
        shape=field.shape,
        chunks=(3, *[min(CHUNK, n) for n in field.shape[1:]]),
        dtype=np.float32,
        compressors=COMPRESSOR_V3,
        zarr_format=3,
        overwrite=True,
    )
    array[:] = field
    array.attrs.update(attrs)


def _write_stack(writer: Any, volume: np.ndarray) -> None:
    """Write a whole ``(Z, Y, X)`` volume into an :class:`emalign.io.OmeZarrWriter`, in slabs of CHUNK sections."""
    from emalign.io import cast_to_dtype, downsample2

    for z0 in range(0, volume.shape[0], CHUNK):
        slab = cast_to_dtype(volume[z0 : z0 + CHUNK], writer.dtype)
        writer.arrays[0][z0 : z0 + slab.shape[0]] = slab
        for array in writer.arrays[1:]:
            slab = np.stack([downsample2(section) for section in slab])
            array[z0 : z0 + slab.shape[0]] = slab
        writer.done[z0 : z0 + slab.shape[0]] = True
    writer.mark_complete()


def register_files(
    fixed_path: str,
    moving_path: str,
    out: str,
    field_path: str | None = None,
    model: str = volumetric.DEFAULT_MODEL,
    patch: int = PATCH,
    overlap: int = OVERLAP,
    device: str = "auto",
    affine: bool = True,
    moving_labels: str | None = None,
    fixed_labels: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Register two volumes given as TIFF/Zarr/OME-Zarr paths; write the warped moving volume as OME-Zarr.

    Writes ``out`` (OME-Zarr, the moving volume on the fixed grid, moving's dtype, 64^3 chunks,
    provenance in ``attrs["emalign"]``), the field (Zarr array ``(3, Z, Y, X)`` float32, voxels,
    pull convention) at ``field_path`` (default ``out/field``), and with ``moving_labels`` the
    nearest-neighbour warped labels at ``out/labels``. Returns a summary (seconds, field
    statistics, folding %, Dice before/after when both label volumes are given).
    """
    from emalign.io import OmeZarrWriter, _version, create_array, open_stack

    start = time.perf_counter()
    fixed, moving = open_stack(fixed_path), open_stack(moving_path)
    net = volumetric.load(model, "cpu")
    params = {
        "step": "volume-register",
        "model": str(model),
        "patch": patch,
        "overlap": overlap,
        "affine": affine,
    }
    attrs = {
        "version": _version(),
        "input": {
            name: {"path": str(Path(path).resolve()), "shape": list(stack.shape), "dtype": str(stack.dtype)}
            for name, path, stack in (("fixed", fixed_path, fixed), ("moving", moving_path, moving))
        },
        "model": {"name": str(model), "kind": net.kind, "checksum": volumetric.checksum(model)},
        "params": params,
        "field": "pull field (dz, dy, dx) in voxels of the fixed grid: out(p) = moving(p + u(p))",
    }
    writer = OmeZarrWriter.create(
        out, fixed.shape, moving.dtype, fixed.voxel_size, fixed.unit, (CHUNK,) * 3, attrs=attrs, overwrite=overwrite
    )
    prealign = fit_affine(fixed.data, moving.data) if affine else None
    field = predict_field(net, fixed.data, moving.data, patch, overlap, device, prealign, progress)
    warped = warp_volume(moving.data, field, progress=progress)
    _write_stack(writer, warped)
    field_attrs = {
        "emalign": {
            "convention": "pull: warped(p) = moving(p + u(p)); channels (dz, dy, dx); voxels of the fixed grid",
            "stride": 1,
            "model": attrs["model"],
            "fixed": attrs["input"]["fixed"]["path"],
            "moving": attrs["input"]["moving"]["path"],
        }
    }
    target = Path(field_path) if field_path else Path(out) / "field"
    _write_field(target, field, field_attrs)
    summary = {
        "seconds": time.perf_counter() - start,
        "shape": list(fixed.shape),
        "mean_displacement": float(np.sqrt((field**2).sum(0)).mean()),
        "max_displacement": float(np.sqrt((field**2).sum(0)).max()),
        "folding_percent": fields.folding_percent(field),
        "field": str(target),
    }
    if moving_labels:
        labels = open_stack(moving_labels).data
        warped_labels = warp_volume(labels, field, order=0).round().astype(np.int32)
        create_array(out, "labels", warped_labels.shape, (CHUNK,) * 3, np.int32, overwrite=True)[:] = warped_labels
        if fixed_labels:
            from emalign.volumetric.losses import mean_dice

            reference = np.asarray(open_stack(fixed_labels).data.compute())
            before = _read_on_grid(labels, tuple(slice(0, n) for n in fixed.shape)).astype(np.int32)
            summary["dice_before"] = mean_dice(before, reference)
            summary["dice_after"] = mean_dice(warped_labels, reference)
    return summary
