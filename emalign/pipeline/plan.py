"""The alignment plan: parameters, z-blocks and xy tiles, written into the output.

The plan is plain data (JSON in the output's attributes), so a run can be inspected,
resumed, and fanned out by z-range on a cluster.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from emalign.errors import EmalignError
from emalign.layout import NGFF_VERSIONS, SHARD_XY
from emalign.options import DEFAULT_MODEL, param

POLISH_MODES = ("auto", "on", "off")
ESTIMATE_BYTES_PER_PX = 80
"""Memory of an estimate task per pixel of its region (the window's sections, the fields; measured:
benchmarks/results/speed_large.md), from which :attr:`Plan.task_tile` sizes the tiles under ``--memory-per-task``."""
ESTIMATE_FIXED_BYTES = 0.5 * 2**30
"""Memory of an estimate task whatever its region (the network's activations on one batch of its tiles)."""
MATCH_BYTES_PER_PX = 340
"""Memory of the rigid and affine matching (:func:`emalign.rigid.pairwise_rigid`) per block mean of a section
(spectra, polar transforms, patches of the sections held), from which :attr:`Plan.coarse_factor` is chosen."""
MIN_TASK_TILE = 512
"""Smallest xy task tile chosen under ``--memory-per-task`` (smaller ones spend most of their work on context)."""
BASE_BYTES = 0.4 * 2**30
"""What a worker holds before any task (Python, torch, the model), taken off ``--memory-per-task``."""


def _budget(params: AlignParams) -> float:
    """Bytes a task's arrays may take: ``params.memory_per_task`` less :data:`BASE_BYTES`."""
    return max(params.memory_per_task * 2**30 - BASE_BYTES, 2**28)


@dataclass(frozen=True)
class AlignParams:
    """User-facing parameters of an alignment; two runs agree when these agree.

    Attributes:
        model: shipped model name or checkpoint path.
        stride: spacing (full-resolution px) of the stored field grids.
        block: sections per estimate/render task.
        stitch_block, stitch_overlap: z-block length and overlap of the stitch solve.
        spring: pull of the stitch towards the prealigned geometry.
        smoothing: Gaussian sigma (full-resolution px) applied to each network field
            before the stitch (misalignment is smooth; this removes estimation noise).
        tile, halo: xy tile size and overlap (px) of the network's estimate (neighbouring tiles share
            ``2 * halo``); 32 is as accurate as 64 and leaves less of the network's work on large sections
            computed twice (figures: benchmarks/results/design_choices.md).
        coarse_downsample: block-mean factor of the rigid prealignment.
        trend_stiffness: curvature weight (sections^4) of the prealignment's and the refine stage's
            trend along z: what follows the trend is kept as content drift, the rest corrected
            (larger: a straighter trend; 1e4 bends over a few tens of sections). The shifts' trend is
            softer where the raw sections step by little more than their content flows (an aligned stack:
            :data:`emalign.pipeline.estimate.CONTENT_STEP_NM`), and the refine stage follows it. The
            prealignment's angles use 1/100 of it (:data:`emalign.pipeline.estimate.ANGLE_TREND_FACTOR`);
            at fine z-spacing the refine stage uses 10x (:mod:`emalign.pipeline.refine`).
        max_rotation_deg: largest rotation the prealignment searches.
        skip: sections the user marks as bad (bridged and written through unchanged).
        level: input OME-Zarr level to align.
        adapt: steps of test-time adaptation (fine-tuning the model on this stack first; 0: off).
        polish: ``auto``, ``on`` or ``off``: the polish stage's patch-wise translations (``auto``: only at
            fine z-spacing, see :mod:`emalign.pipeline.polish`).
        polish_patch: side of the polish stage's patches, px (half overlapping).
        mask: path of a mask stack of the input's shape, non-zero where pixels are invalid (cracks,
            folds, debris); detected invalid pixels (no data, saturated, featureless) are added.
        voxel_size: ``(z, y, x)`` in ``unit``, overriding the input's metadata (empty: from the input, or
            estimated from the data where it has none; see :mod:`emalign.pixelsize`).
        unit: the unit of ``voxel_size`` (an OME-NGFF length unit).
        ngff: output layout, ``0.5`` (Zarr v3, sharded levels) or ``0.4`` (Zarr v2, for older readers).
        shard: y/x side (px) of the output levels' shards under NGFF 0.5 (0: none), one section deep.
        task_tile: side (px, rounded up to a multiple of ``stride``) of the xy tiles that split
            the estimate and stitch tasks (:meth:`Plan.tiles`): a task holds one tile and the context around it
            (:func:`emalign.pipeline.estimate.task_region`), never a whole larger section. Sections up to this
            size are one tile. 0: the largest tile whose estimate task fits ``memory_per_task``.
        memory_per_task: GiB one task may hold, about (the scheduler runs several at once): it sets the task tile
            (``task_tile`` 0) and the block-mean factor of the prealignment's and the refine stage's matching,
            ``coarse_downsample`` or larger where a section at that factor would not fit (:meth:`Plan.coarse_factor`).

    Each field's metadata holds its command-line option (see :func:`emalign.options.param`).

    Lengths in px (``stride``, ``smoothing``, ``tile``, ``halo``, ``polish_patch``) are pixels of the working
    resolution (:class:`emalign.pixelsize.Resolution`: 10 nm where the input's pixels are 10 nm or finer);
    :meth:`working` scales them for what the integer working factor leaves.
    """

    model: str = param(DEFAULT_MODEL, "shipped model name or .pt checkpoint")
    stride: int = param(8, "field grid spacing, px")
    block: int = param(16, "sections per task")
    stitch_block: int = param(128, "sections per stitch solve")
    stitch_overlap: int = param(32, "overlap of stitch solves")
    spring: float = param(0.2, "stitch pull towards the prealignment")
    smoothing: float = param(16.0, "Gaussian sigma of the network fields, px")
    tile: int = param(512, "xy tile of the network, px")
    halo: int = param(32, "xy tile overlap, px")
    coarse_downsample: int = param(2, "prealignment resolution factor")
    trend_stiffness: float = param(1e4, "prealignment trend along z")
    max_rotation_deg: float = param(10.0, "prealignment rotation search, deg", flag="--max-rotation")
    skip: tuple[int, ...] = param((), "bad sections to bridge, e.g. 12,40", expect="comma-separated section numbers")
    level: int = param(0, "input OME-Zarr level")
    adapt: int = param(0, "fine-tune the model on this stack for N steps first (0: off)")
    polish: str = param(
        "auto", "patch-wise translations after refine (auto: at fine z-spacing only)", choices=POLISH_MODES
    )
    polish_patch: int = param(96, "polish patch side, px")
    mask: str = param("", "mask stack (TIFF/Zarr, IN's shape), non-zero = invalid pixels", path=True)
    voxel_size: tuple[float, ...] = param(
        (), "z,y,x of IN in --unit (default: IN's metadata, else estimated)", expect="three numbers z,y,x", length=3
    )
    unit: str = param("nanometer", "unit of --voxel-size")
    ngff: str = param(
        NGFF_VERSIONS[0],
        "output layout: 0.5 (Zarr v3, sharded) or 0.4 (Zarr v2, for older readers)",
        choices=NGFF_VERSIONS,
        layout=True,
    )
    shard: int = param(SHARD_XY, "y/x side of a shard (file) of the 0.5 output, px; 0: none", layout=True)
    task_tile: int = param(0, "xy tile of the estimate and stitch tasks, px (0: from --memory-per-task)")
    memory_per_task: float = param(
        2.0,
        "GiB a task may hold, about: sets --task-tile 0 and the prealignment's resolution on large sections",
    )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skip"] = list(self.skip)
        data["voxel_size"] = list(self.voxel_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AlignParams:
        return cls(**{**data, "skip": tuple(data.get("skip", ())), "voxel_size": tuple(data.get("voxel_size", ()))})

    def working(self, ratio: float) -> AlignParams:
        """These parameters for a working pixel ``ratio`` times the training data's: the lengths that are
        physical (smoothing, polish patch, prealignment resolution) divided by it; the rest unchanged."""
        if ratio == 1.0:
            return self
        return replace(
            self,
            smoothing=self.smoothing / ratio,
            polish_patch=max(16, round(self.polish_patch / ratio)),
            coarse_downsample=max(1, round(self.coarse_downsample / ratio)),
        )

    def validate(self) -> None:
        if self.stride < 1 or self.block < 1 or self.tile < 32 or self.halo < 0 or 2 * self.halo >= self.tile:
            raise EmalignError(
                f"bad plan: stride {self.stride}, block {self.block}, tile {self.tile}, halo {self.halo} "
                "(need stride, block >= 1, tile >= 32, 0 <= 2 * halo < tile)"
            )
        if self.task_tile and self.task_tile < 16:
            raise EmalignError(f"bad plan: --task-tile {self.task_tile} (need 0 (auto) or at least 16 px)")
        if not (math.isfinite(self.memory_per_task) and self.memory_per_task > 0):
            raise EmalignError(f"bad plan: --memory-per-task {self.memory_per_task} (need a positive number of GiB)")
        if self.polish not in POLISH_MODES:
            raise EmalignError(f"bad plan: --polish {self.polish!r}; expected one of {', '.join(POLISH_MODES)}")
        if self.polish_patch < 16:
            raise EmalignError(f"bad plan: --polish-patch {self.polish_patch} (need at least 16 px)")
        if self.adapt < 0:
            raise EmalignError(f"bad plan: --adapt {self.adapt} must be 0 (off) or a number of steps")
        if self.voxel_size and (
            len(self.voxel_size) != 3 or not all(math.isfinite(v) and v > 0 for v in self.voxel_size)
        ):
            raise EmalignError(f"bad plan: --voxel-size {self.voxel_size} (need three positive numbers z,y,x)")
        if not 0 <= self.stitch_overlap < self.stitch_block:
            raise EmalignError(
                f"bad plan: stitch overlap {self.stitch_overlap} must be below the block {self.stitch_block}"
            )


@dataclass(frozen=True)
class Plan:
    """Where the work is: the stack's shape, the field grid, the z-blocks and the xy task tiles."""

    shape: tuple[int, int, int]
    params: AlignParams = field(default_factory=AlignParams)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Shape of a field grid: sample ``i`` sits at full-resolution ``i * stride``."""
        s = self.params.stride
        return math.ceil(self.shape[1] / s), math.ceil(self.shape[2] / s)

    @property
    def task_tile(self) -> int:
        """Side (px) of the xy task tiles: ``params.task_tile``, or with 0 the side that cuts the section into the
        fewest equal tiles whose estimate task (the tile and its context: :func:`emalign.pipeline.estimate.task_region`)
        holds about ``params.memory_per_task`` (:data:`ESTIMATE_BYTES_PER_PX`, :data:`ESTIMATE_FIXED_BYTES`); rounded
        up to a multiple of the stride, so a tile's grid points (one chunk of the field arrays) belong to no other
        tile."""
        s, params = self.params.stride, self.params
        side = params.task_tile
        if not side:
            context = 4 * params.smoothing + params.tile - 2 * params.halo  # per side, at most: smoothing, network
            region = math.sqrt(max(_budget(params) - ESTIMATE_FIXED_BYTES, 0) / ESTIMATE_BYTES_PER_PX)
            largest, longest = max(MIN_TASK_TILE, int(region - 2 * context)), max(self.shape[1:])
            side = math.ceil(longest / math.ceil(longest / largest))
        return math.ceil(side / s) * s

    @property
    def coarse_factor(self) -> int:
        """Block-mean factor of the prealignment's and the refine stage's matching: ``params.coarse_downsample``,
        or the smallest larger one at which a section's matching holds about ``params.memory_per_task`` at most
        (:data:`MATCH_BYTES_PER_PX` per block mean)."""
        factor, area = self.params.coarse_downsample, self.shape[1] * self.shape[2]
        while area / factor**2 * MATCH_BYTES_PER_PX > _budget(self.params) and min(self.shape[1:]) >= 4 * factor:
            factor += 1
        return factor

    def tiles(self) -> list[tuple[int, int, int, int]]:
        """``(y0, x0, h, w)`` xy task tiles (px) covering a section, row by row."""
        height, width, side = self.shape[1], self.shape[2], self.task_tile
        return [
            (y0, x0, min(side, height - y0), min(side, width - x0))
            for y0 in range(0, height, side)
            for x0 in range(0, width, side)
        ]

    def grid_slices(self, tile: tuple[int, int, int, int]) -> tuple[slice, slice]:
        """The field-grid rows and columns of a task tile (the grid points inside it)."""
        y0, x0, h, w = tile
        s = self.params.stride
        return slice(y0 // s, math.ceil((y0 + h) / s)), slice(x0 // s, math.ceil((x0 + w) / s))

    def task_index(self, block: int, tile: int) -> int:
        """Index of the (z-block, xy tile) task in ``stages/estimate`` (one marker per task)."""
        return block * len(self.tiles()) + tile

    def blocks(self, z_range: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """``[start, stop)`` task blocks of ``params.block`` sections, optionally only those in a z-range."""
        depth, size = self.shape[0], self.params.block
        all_blocks = [(z, min(z + size, depth)) for z in range(0, depth, size)]
        if z_range is None:
            return all_blocks
        lo, hi = z_range
        return [(a, b) for a, b in all_blocks if a < hi and b > lo]

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "grid_shape": list(self.grid_shape),
            "blocks": [list(b) for b in self.blocks()],
            "tiles": [list(t) for t in self.tiles()],
            "params": self.params.to_dict(),
        }


def parse_z_range(text: str | None, depth: int) -> tuple[int, int] | None:
    """``"a:b"`` (Python-slice style, either side optional) -> ``(a, b)`` clipped to the stack."""
    if not text:
        return None
    try:
        lo_text, hi_text = text.split(":")
        lo = int(lo_text) if lo_text else 0
        hi = int(hi_text) if hi_text else depth
    except ValueError:
        raise EmalignError(f"--z-range {text!r}: expected START:STOP, e.g. 0:100") from None
    lo, hi = max(lo, 0), min(hi, depth)
    if lo >= hi:
        raise EmalignError(f"--z-range {text!r} selects no section of a {depth}-section stack")
    return lo, hi
