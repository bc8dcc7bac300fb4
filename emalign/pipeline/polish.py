"""Stage 5: local translations of the refined sections, patch by patch, at fine z-spacing.

Where adjacent sections are nearly the same image (FIB-SEM, ssTEM at ~20 nm and finer), phase
correlation of small patches (:mod:`emalign.patches`) is more precise than the network, whose
fields keep about 0.5 px of error there. Where sections differ more, patch matches follow the
content's own changes and do harm. ``--polish auto`` (the default) therefore polishes only at fine
z-spacing (:func:`emalign.pipeline.refine.fine_spacing`: adjacent refined sections correlate
strongly). On the FlyEM benchmark stacks it roughly halves the section-to-section error at 10 nm and
helps at 20 nm; at 30 and 40 nm it would follow the content and is left off (figures:
benchmarks/results/design_choices.md).

polish
    per z-block: every section warped at full resolution by its refined field, and each of its
    patches (``polish_patch`` px, half overlapping) phase-correlated with the same patch of the
    3 sections before it; once every block is done, for a tile of nodes at a time, the prealignment's
    robust solve restricted to translations (:func:`node_shifts`: breaks and bad sections, a z-trend of
    :data:`TREND_STIFFNESS` kept) gives one shift per section and node; interpolated between nodes, the
    shifts are composed into ``fields/global``. A stack left alone keeps its refined fields.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from emalign.consensus import smooth_trend
from emalign.device import resolve_device
from emalign.fields import compose
from emalign.io import Stack
from emalign.patches import PatchGrid
from emalign.pipeline.refine import WarpedSections, fine_spacing
from emalign.pipeline.store import NODE_TILE, OFFSETS, Workspace
from emalign.rigid import soft_ramp, solve_translations

POLISH_NODES = 32
"""Patch-grid nodes per side of the bands a polish task matches one at a time (its memory: a band's spectra)."""
TREND_STIFFNESS = 1e3
"""Curvature weight of the z-trend kept in each node's shifts. The polish corrects section-to-section
error; slower trends, which patch matches cannot tell from the content's own drift, are left to the
stages before. 10x more flexible than their default: aligned stacks are moved less, and misaligned ones end
about as well (figures: benchmarks/results/design_choices.md). Softened as the prealignment's shift trend is
(``coarse/stiffness`` over ``--trend-stiffness``), so that an aligned stack keeps its content's flow here too."""


def polish_grid(ws: Workspace) -> PatchGrid:
    """The patch grid of this alignment's sections."""
    return PatchGrid.for_shape(ws.plan.shape[1:], ws.params.polish_patch)


def polish_wanted(ws: Workspace) -> bool:
    """Whether this stack is polished: ``--polish on``/``off``, or under ``auto`` at fine z-spacing."""
    if ws.params.polish != "auto":
        return ws.params.polish == "on"
    return fine_spacing(ws)


def _band_region(
    grid: PatchGrid, rows: slice, cols: slice, section: tuple[int, ...], margin: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(origin, shape)`` of the region of a ``section (Y, X)`` under the patches ``rows``, ``cols`` of ``grid``,
    widened by ``margin`` px within the section."""
    lo = [max(0, int(grid.ys[rows][0]) - margin), max(0, int(grid.xs[cols][0]) - margin)]
    hi = [
        min(section[0], int(grid.ys[rows][-1]) + grid.size[0] + margin),
        min(section[1], int(grid.xs[cols][-1]) + grid.size[1] + margin),
    ]
    return (lo[0], lo[1]), (hi[0] - lo[0], hi[1] - lo[1])


def polish_block(ws: Workspace, stack: Stack, index: int, device: str = "auto") -> None:
    """Patch shifts of the refined sections of block ``index`` against the 3 before each, a band of
    :data:`POLISH_NODES` x :data:`POLISH_NODES` nodes at a time: each section's region under the band's patches (and
    the margin its no-data weights reach) is warped and matched (on ``device``), never the whole section."""
    start, stop = ws.plan.blocks()[index]
    first = max(start - max(OFFSETS), 0)
    grid, dev = polish_grid(ws), resolve_device(device)
    sections = WarpedSections(ws, stack, first, stop, 1, "fields/refined", dev)
    ramp = soft_ramp(ws.plan.shape[1:])  # the whole section's, so that a region's weights are the section's
    margin = math.ceil(ramp) + 1
    table = np.full((stop - start, len(OFFSETS), *grid.shape, 3), np.nan, np.float32)
    for r0 in range(0, grid.shape[0], POLISH_NODES):
        for c0 in range(0, grid.shape[1], POLISH_NODES):
            rows, cols = slice(r0, r0 + POLISH_NODES), slice(c0, c0 + POLISH_NODES)
            origin, shape = _band_region(grid, rows, cols, ws.plan.shape[1:], margin)
            band = grid.part(rows, cols, origin)
            spectra: dict[int, torch.Tensor] = {}
            for z in range(first, stop):
                spectra[z] = band.spectra(sections.region(z - first, origin, shape), ramp, dev)
                spectra.pop(z - max(OFFSETS) - 1, None)
                for i, k in enumerate(OFFSETS):
                    if z >= start and z - k in spectra:
                        shifts, peaks = band.match(spectra[z - k], spectra[z])
                        table[z - start, i, rows, cols] = np.concatenate([shifts, peaks[..., None]], axis=-1)
    ws.array("polish/pairs")[start:stop] = table
    ws.mark_done("polish", index)


def node_shifts(
    pairs: np.ndarray, excluded: np.ndarray, breaks: list[int], trend_stiffness: float | np.ndarray
) -> np.ndarray:
    """``(Z, 2, ny, nx)`` shifts of a tile of nodes from their ``(Z, len(OFFSETS), ny, nx, 3)`` pair shifts and peaks.

    Segment by segment, the prealignment's robust solve without rotations
    (:func:`emalign.rigid.solve_translations`: pairs touching an excluded section do not count), minus
    the z-trend of ``trend_stiffness`` (``(Z,)``: per section, a segment takes its first section's); excluded
    sections get zero.
    """
    depth, _, ny, nx, _ = pairs.shape
    stiffness = np.broadcast_to(np.asarray(trend_stiffness, np.float64), (depth,))
    solution = np.zeros((depth, ny * nx, 2))
    for start, stop in zip([0, *breaks], [*breaks, depth], strict=True):
        index = [(z, i) for z in range(start, stop) for i, k in enumerate(OFFSETS) if z - k >= start]
        if not index:
            continue
        moving, slot = np.array(index).T
        fixed = moving - np.asarray(OFFSETS)[slot]
        table = pairs[moving, slot].reshape(len(index), ny * nx, 3)
        scores = np.where((excluded[moving] | excluded[fixed])[:, None], 0.0, table[..., 2])
        solved = solve_translations(stop - start, moving - start, fixed - start, table[..., :2], scores)
        solution[start:stop] = solved - smooth_trend(solved, stiffness[start], (~excluded[start:stop]).astype(float))
    solution[excluded] = 0.0
    return np.transpose(solution.reshape(depth, ny, nx, 2), (0, 3, 1, 2))


def solve_polish(ws: Workspace, polished: bool) -> None:
    """Write ``fields/global``: the refined fields, with the solved node shifts composed in where the stack is
    ``polished`` (:func:`polish_wanted`); marks the stage done."""
    params, plan = ws.params, ws.plan
    refined, output = ws.array("fields/refined"), ws.array("fields/global")
    excluded, breaks = ws.excluded(), list(ws.breaks())
    grid, shifts = polish_grid(ws), ws.array("polish/shifts")
    if polished:
        pairs = ws.array("polish/pairs")
        flow = np.asarray(ws.array("coarse/stiffness")[:]) / params.trend_stiffness  # the prealignment's softening
        for y in range(0, grid.shape[0], NODE_TILE):  # a tile of nodes at a time: memory flat in the section size
            for x in range(0, grid.shape[1], NODE_TILE):
                tile = np.asarray(pairs[:, :, y : y + NODE_TILE, x : x + NODE_TILE])
                ny, nx = tile.shape[2:4]
                shifts[:, :, y : y + ny, x : x + nx] = node_shifts(tile, excluded, breaks, TREND_STIFFNESS * flow)
    for start, stop in plan.blocks():
        block = np.asarray(shifts[start:stop]) if polished else None
        for z in range(start, stop):
            field = np.asarray(refined[z])
            if block is not None and not excluded[z]:
                field = compose(field, grid.field(block[z - start], plan.grid_shape, params.stride), params.stride)
            output[z] = field
    ws.array("stages/polish")[:] = True
