"""The output folder of an alignment: the aligned OME-Zarr plus the pipeline's own arrays.

Layout (one Zarr group: NGFF 0.5 on Zarr v3 by default, NGFF 0.4 on Zarr v2 with ``--ngff 0.4``; the
pipeline's arrays sit next to the levels, which validators and NGFF readers ignore: they follow ``multiscales``)::

    OUT/0, OUT/1, ...          aligned pyramid (emalign.io.OmeZarrWriter; v3: shards of 1 x --shard^2 px),
                               OUT/done per section
    OUT/sections/flags         (Z,) uint8: 1 blank, 2 damaged, 4 skipped by the user, 8 break (first
                               section of a segment that matches nothing before it)
    OUT/sections/stats         (Z, 3) float32: valid fraction, contrast (std / 255 or range), peak of the
                               section before against this one turned by 180 degrees (the score of
                               unrelated content; NaN for the first section)
    OUT/sections/contrast      (Z,) float32: median contrast of the section's 32 px blocks (emalign.masks), what
                               every part of it read alone is masked against
    OUT/coarse/pairs           (Z, K, 7) float64: pairwise rigid matrix (6) + score per offset
    OUT/coarse/affine          (Z, K, 7) float64: the same pairs refined to affine matrices (as coarse/pairs)
    OUT/coarse/margins         (Z, K) float64: how far each pair's kept match stands above unrelated content at
                               its own scale (emalign.rigid.pairwise_rigid's margins; NaN where not asked)
    OUT/coarse/matrices        (Z, 2, 3) float64: prealignment (pull affine, working px)
    OUT/coarse/stiffness       (Z,) float64: stiffness of the prealignment's shift trend in each section's segment
    OUT/fields/relative        (Z, 2, gy, gx) float32: network field of each section vs its neighbours
    OUT/fields/stitched        (Z, 2, gy, gx) float32: stitched pull field per section (prealignment included)
    OUT/refine/pairs           (Z, K, 7) float64: pairwise translations of the stitched sections (as coarse/pairs)
    OUT/fields/refined         (Z, 2, gy, gx) float32: stitched, then the refine stage's shift
    OUT/polish/pairs           (Z, K, ny, nx, 3) float32: per patch-grid node, pull shift (2) + peak per offset
    OUT/polish/shifts          (Z, 2, ny, nx) float32: solved shift per section and node
    OUT/fields/global          (Z, 2, gy, gx) float32: final pull field per section (refined, then polished)
    OUT/stages/<stage>         (n_blocks,) bool: finished blocks, for resuming (refine, polish: one more,
                               the solve; estimate: one per (block, xy task tile), ``Plan.task_index``;
                               stitch: one per xy task tile)
    OUT/model/adapted.pt       the model fine-tuned on this stack (``--adapt N``), with its provenance
    OUT/qc.csv, OUT/qc.png     per-section quality table and plot

OUT may be a URL (``s3://``, ``gs://``; :mod:`emalign.stores`): every Zarr array above, the stage markers
included, lives in the object store (each task writes its own chunks, so a killed run resumes from there), while
``qc.csv``, ``qc.png`` and ``model/`` are made in a local work folder (:attr:`Workspace.files`) and copied to OUT.

attrs["emalign"] holds the version, input, params, plan, resolution (:class:`emalign.pixelsize.Resolution`),
model checksum and ``complete``. Every stage before render works at the working resolution, ``factor`` x
coarser than the input (block means; 1 for inputs of 10 nm pixels or coarser), and so do the arrays: fields
are stored on a grid of stride ``s``: sample ``i`` sits at working pixel ``i * s``, values in working pixels,
pull convention, channels (dy, dx); chunked per section and xy task tile. Render multiplies both by ``factor``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import zarr

from emalign import __version__, io, models, stores
from emalign.errors import EmalignError
from emalign.io import OmeZarrWriter, Stack, check_chunk, downsampled, emalign_attrs, open_stack
from emalign.patches import PatchGrid
from emalign.pipeline.plan import AlignParams, Plan
from emalign.pipeline.stages import MARKED, requirements
from emalign.pixelsize import (
    ESTIMATE_CROP,
    PLACEHOLDER,
    Resolution,
    check_pixel_size,
    check_spacings,
    estimate_pixel_size,
    to_nanometres,
    working_resolution,
)

OFFSETS = (1, 2, 3)
FLAG_BLANK, FLAG_DAMAGED, FLAG_SKIPPED, FLAG_BREAK = 1, 2, 4, 8
FLAG_NAMES = {FLAG_BLANK: "blank", FLAG_DAMAGED: "damaged", FLAG_SKIPPED: "skipped", FLAG_BREAK: "break"}
EXCLUDING = FLAG_BLANK | FLAG_DAMAGED | FLAG_SKIPPED
"""Flags of sections that get no estimate of their own (bridged, written through unchanged)."""
NODE_TILE = 16
"""Patch-grid nodes per side of the chunks of ``polish/pairs`` and ``polish/shifts`` (solved a tile at a time)."""
MIN_SIDE = 4
"""Smallest section side (px) the network takes; the rigid prealignment needs 2 * coarse_downsample."""


def check_values(params: AlignParams) -> None:
    """Refuse parameter values that would crash a stage or quietly give an empty result (NaN spring: all-zero
    output marked complete); :meth:`AlignParams.validate` checks the plan's shape."""
    if params.coarse_downsample < 1:
        raise EmalignError(f"bad plan: coarse_downsample {params.coarse_downsample} (need >= 1)")
    for name in ("spring", "smoothing", "trend_stiffness", "max_rotation_deg"):
        value = float(getattr(params, name))
        positive = name == "trend_stiffness"  # the weight the polish's trend is scaled by: 0 would divide by 0
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise EmalignError(f"bad plan: {name} {value} (need a finite number {'>' if positive else '>='} 0)")


def _central_crops(stack: Stack, count: int = 5) -> list[np.ndarray]:
    """Central crops (at most :data:`ESTIMATE_CROP` px a side) of ``count`` sections spread over the stack; a
    section that cannot be read raises, before the output exists: an estimate made without it would change
    once it is repaired, and with it the work a resumed run keeps."""
    depth, height, width = stack.shape
    crop = min(height, width, ESTIMATE_CROP)
    region = (slice((height - crop) // 2, (height + crop) // 2), slice((width - crop) // 2, (width + crop) // 2))
    crops = []
    for z in np.unique(np.linspace(0, depth - 1, min(count, depth)).round().astype(int)):
        crops.append(check_chunk(stack, int(z), require_finite=False, region=region))
    return crops


def stack_resolution(
    stack: Stack, params: AlignParams, kept: Resolution | None = None
) -> tuple[Resolution, tuple[float, float, float], str]:
    """The input's :class:`Resolution` (from ``--voxel-size``, else its metadata, else estimated from its
    texture, or ``kept``: the estimate of the run being resumed), and the voxel size and unit the aligned
    output carries (the input's unless the user gave one)."""
    if params.voxel_size:
        where = f"{stack.path}: --voxel-size {','.join(f'{v:g}' for v in params.voxel_size)} {params.unit}"
        check_spacings(params.voxel_size, params.unit, where)
        pixel = check_pixel_size(to_nanometres(params.voxel_size[1], params.unit), where)
        return working_resolution(pixel, "user"), tuple(params.voxel_size), params.unit
    if stack.voxel_known and stack.voxel_size[1] != PLACEHOLDER:
        check_spacings(stack.voxel_size, stack.unit, f"{stack.path}: metadata")
        try:
            pixel = to_nanometres(stack.voxel_size[1], stack.unit)
        except EmalignError as err:
            raise EmalignError(f"{stack.path}: metadata: {err}") from None
        return working_resolution(check_pixel_size(pixel, stack.path), "metadata"), stack.voxel_size, stack.unit
    estimated = kept or working_resolution(estimate_pixel_size(_central_crops(stack)), "estimated")
    return estimated, stack.voxel_size, stack.unit  # the output's metadata repeats the input's, invents nothing


def working_stack(stack: Stack, factor: int) -> Stack:
    """``stack`` at ``factor`` x coarser pixels: the input's own pyramid level where one has the shape of the
    block means (:func:`emalign.io.downsampled`), else the block means."""
    level = stack.level + int(np.log2(factor))
    if factor > 1 and 2 ** (level - stack.level) == factor:
        try:
            coarser = open_stack(stack.path, level=level)
        except EmalignError:
            coarser = None
        expected = [side // factor for side in stack.shape[1:]]
        if coarser is not None and coarser.shape == (stack.shape[0], *expected):
            return coarser
    return downsampled(stack, factor)


def flag_text(flags: int) -> str:
    """``"blank|damaged"`` style text for a flag byte ('' for a good section)."""
    return "|".join(name for bit, name in FLAG_NAMES.items() if flags & bit)


ArraySpec = tuple[tuple[int, ...], tuple[int, ...], type, dict | None]


def _array_specs(plan: Plan, voxel_size: tuple[float, float, float]) -> dict[str, ArraySpec]:
    """The pipeline's arrays, name -> (shape, chunks, dtype, attrs) (``voxel_size``: nm of a working pixel);
    ``stages/polish`` comes last, so that its presence marks a folder whose arrays were all created."""
    depth = plan.shape[0]
    gy, gx = plan.grid_shape
    stride = plan.params.stride
    field_attrs = {
        "axes": ["z", "c", "y", "x"],
        "channels": ["dy", "dx"],
        "convention": "pull: aligned(p) = raw(p + u(p))",
        "units": "pixels of the working resolution",
        "stride": stride,
        "coordinateTransformations": [
            {"type": "scale", "scale": [voxel_size[0], 1.0, voxel_size[1] * stride, voxel_size[2] * stride]}
        ],
    }
    block = plan.params.block  # arrays written by parallel block tasks: one chunk per block, no shared chunk
    pair_shape, pair_chunks = (depth, len(OFFSETS), 7), (block, len(OFFSETS), 7)
    nodes = PatchGrid.for_shape(plan.shape[1:], plan.params.polish_patch).shape
    tile = (min(nodes[0], NODE_TILE), min(nodes[1], NODE_TILE))
    specs: dict[str, ArraySpec] = {
        "sections/flags": ((depth,), (4096,), np.uint8, None),
        "sections/stats": ((depth, 3), (block, 3), np.float32, None),
        "sections/contrast": ((depth,), (4096,), np.float32, None),
        "coarse/pairs": (pair_shape, pair_chunks, np.float64, None),
        "coarse/affine": (pair_shape, pair_chunks, np.float64, None),
        "coarse/margins": (pair_shape[:2], pair_chunks[:2], np.float64, None),
        "coarse/matrices": ((depth, 2, 3), (4096, 2, 3), np.float64, None),
        "coarse/stiffness": ((depth,), (4096,), np.float64, None),
        "refine/pairs": (pair_shape, pair_chunks, np.float64, None),
        "polish/pairs": ((depth, len(OFFSETS), *nodes, 3), (block, len(OFFSETS), *tile, 3), np.float32, None),
        "polish/shifts": ((depth, 2, *nodes), (block, 2, *tile), np.float32, None),
    }
    side = plan.task_tile // stride  # one chunk per xy task tile: estimate and stitch tasks share no chunk
    for name in ("relative", "stitched", "refined", "global"):
        specs[f"fields/{name}"] = ((depth, 2, gy, gx), (1, 2, side, side), np.float32, field_attrs)
    n_blocks, n_tiles = len(plan.blocks()), len(plan.tiles())
    for stage in MARKED:
        specs[f"stages/{stage.name}"] = ((stage.marker_count(n_blocks, n_tiles),), (1,), bool, None)
    return specs


class Workspace:
    """Access to an alignment's output folder (create once, then open from any process)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(stores.local(path))
        self.writer = OmeZarrWriter.open(self.path)
        self.group = self.writer.group
        meta = self.writer.attrs
        self.resolution = Resolution.from_dict(meta.get("resolution") or {"pixel_nm": 0.0, "source": "metadata"})
        self.params = AlignParams.from_dict(meta["params"]).working(self.resolution.ratio)
        self.plan = Plan(tuple(meta["plan"]["shape"]), self.params)
        self.input_path = meta["input"]["path"]

    @property
    def factor(self) -> int:
        """Input pixels per working pixel (fields are stored in working pixels)."""
        return self.resolution.factor

    def input_stack(self) -> Stack:
        """The input at full resolution (what render warps)."""
        return open_stack(self.input_path, level=self.params.level)

    def working_stack(self) -> Stack:
        """The input at the working resolution (what every stage before render reads)."""
        return working_stack(self.input_stack(), self.factor)

    @classmethod
    def create(cls, stack: Stack, out: str | os.PathLike, params: AlignParams, overwrite: bool = False) -> Workspace:
        """Create the output for ``stack`` (full resolution; or reopen it when params match, to resume, refusing
        a folder that lacks an array this version writes)."""
        params.validate()
        check_values(params)
        source = {"path": stores.absolute(stack.path), "shape": list(stack.shape), "dtype": str(stack.dtype)}
        existing = emalign_attrs(out) or {}
        if existing.get("input") not in (None, source) and not overwrite:
            raise EmalignError(
                f"{out}: holds the alignment of another input ({existing['input']['path']}); use --overwrite"
            )
        resumed = not overwrite and existing.get("input") == source and existing.get("params") == params.to_dict()
        stored = (existing.get("resolution") or {}) if resumed else {}
        kept = Resolution.from_dict(stored) if stored.get("source") == "estimated" else None
        resolution, voxel_size, unit = stack_resolution(stack, params, kept)
        working = working_stack(stack, resolution.factor)
        effective = params.working(resolution.ratio)
        side = max(MIN_SIDE, 2 * effective.coarse_downsample)
        if min(working.shape[1:]) < side:
            raise EmalignError(
                f"{stack.path}: sections of {stack.shape[1]} x {stack.shape[2]} px are too small to align "
                f"(need at least {side} px per side with coarse_downsample {effective.coarse_downsample} "
                f"at {resolution.factor}x block means)"
            )
        plan = Plan(working.shape, effective)
        attrs = {
            "version": __version__,
            "input": source,
            "params": params.to_dict(),
            "plan": plan.to_dict(),
            "resolution": resolution.to_dict(),
            "model": {"name": params.model, "sha256": models.checksum(params.model)},
        }
        writer = OmeZarrWriter.create(
            out,
            stack.shape,
            stack.dtype,
            voxel_size,
            unit,
            attrs=attrs,
            overwrite=overwrite,
            ngff=params.ngff,
            shard=params.shard,
        )
        f = resolution.factor
        arrays = _array_specs(plan, (voxel_size[0], voxel_size[1] * f, voxel_size[2] * f))
        if f"stages/{MARKED[-1].name}" not in writer.group:  # new, or killed while its arrays were being created
            for name, spec in arrays.items():
                io.create_array(out, name, *spec, overwrite=True)
        elif missing := [name for name in arrays if name not in writer.group]:
            raise EmalignError(
                f"{out}: written by an older emalign, it lacks {', '.join(missing)}; "
                "rerun with --overwrite to align it again"
            )
        return cls(out)

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def stage_done(self, stage: str) -> np.ndarray:
        return np.asarray(self.array(f"stages/{stage}")[:], bool)

    def mark_done(self, stage: str, index: int) -> None:
        self.array(f"stages/{stage}")[index] = True

    def check_requirements(self, stage: str) -> None:
        """Refuse to run ``stage`` before the stages it requires (:data:`emalign.pipeline.stages.TABLE`) finished."""
        for needed in requirements(stage, self.params):
            self.require(needed)

    def require(self, stage: str) -> None:
        """Refuse to go on before ``stage`` has finished every block."""
        missing = np.flatnonzero(~self.stage_done(stage))
        if missing.size:
            raise EmalignError(
                f"{self.path}: stage {stage!r} has {missing.size} unfinished block(s); run `emalign {stage}` first"
            )

    def flags(self) -> np.ndarray:
        return np.asarray(self.array("sections/flags")[:], np.uint8)

    @property
    def files(self) -> Path:
        """The local folder of the output's non-Zarr files: OUT itself, or for an OUT given as a URL a local work
        folder (:func:`emalign.stores.work_folder`) whose files :meth:`publish` copies to OUT."""
        return stores.work_folder(self.path) if stores.is_url(self.path) else Path(self.path)

    def publish(self, file: Path) -> None:
        """Copy ``file`` (under :attr:`files`) to the same place under an OUT given as a URL (local OUT: nothing
        to do)."""
        if stores.is_url(self.path):
            stores.upload(file, stores.join(self.path, *file.relative_to(self.files).parts))

    @property
    def adapted_model_path(self) -> Path:
        path = self.files / "model" / "adapted.pt"
        path.parent.mkdir(exist_ok=True)
        return path

    @property
    def model(self) -> str:
        """The checkpoint the estimate uses: the adapted one under ``--adapt`` (for a URL OUT, copied from there
        when this machine has none), else ``params.model``."""
        if not self.params.adapt:
            return self.params.model
        path = self.adapted_model_path
        if stores.is_url(self.path) and not path.exists():
            stores.download(stores.join(self.path, "model", path.name), path)
        return str(path)

    def excluded(self) -> np.ndarray:
        """``(Z,)`` bool: sections bridged and written through unchanged (blank, damaged, skipped)."""
        return (self.flags() & EXCLUDING) != 0

    def breaks(self) -> tuple[int, ...]:
        """First sections of the stack's later segments (see :mod:`emalign.consensus`)."""
        return tuple(int(z) for z in np.flatnonzero(self.flags() & FLAG_BREAK))


def open_workspace(out: str | os.PathLike) -> Workspace:
    """Open an existing output folder (clear error when it is not one)."""
    if not stores.exists(out):
        raise EmalignError(f"{out}: no such output; run `emalign align` (or the first stage) to create it")
    return Workspace(out)
