"""Stage 3: one global field per section from the overlapping relative estimates.

The relative fields are reconciled in overlapping z-blocks (:mod:`emalign.consensus`),
blended across the overlaps, composed with the rigid prealignment and written to
``fields/stitched`` (the refine stage makes ``fields/global`` from them). A task solves one xy task tile of
the field grid through the whole stack; only one z-block of that tile's fields is in memory at a time.
"""

from __future__ import annotations

import numpy as np

from emalign import consensus, models
from emalign.fields import affine_field, compose
from emalign.pipeline.store import Workspace


def coarse_composed(
    matrix: np.ndarray, correction: np.ndarray, stride: int, corner: tuple[int, int], grid: tuple[int, int]
) -> np.ndarray:
    """``compose(prealignment, correction)`` on a window of the field grid, as on the whole grid.

    ``correction (2, h, w)``: the window at grid point ``corner`` of a ``grid``-shaped field grid; ``matrix``: the
    prealignment (pull affine). The prealignment's field is taken on the window widened by the correction's reach
    (within the grid), so it is sampled, and clamped at the grid's edges, exactly where the whole grid's would be.
    """
    reach = int(np.ceil(np.abs(correction).max(initial=0.0) / stride)) + 1
    height, width = correction.shape[1:]
    lo = (max(corner[0] - reach, 0), max(corner[1] - reach, 0))
    hi = (min(corner[0] + height + reach, grid[0]), min(corner[1] + width + reach, grid[1]))
    inner = (slice(corner[0] - lo[0], corner[0] - lo[0] + height), slice(corner[1] - lo[1], corner[1] - lo[1] + width))
    wide = np.zeros((2, hi[0] - lo[0], hi[1] - lo[1]), np.float32)
    wide[:, inner[0], inner[1]] = correction
    coarse = affine_field(matrix, wide.shape[1:], stride=stride, origin=(lo[0] * stride, lo[1] * stride))
    return compose(coarse, wide, stride=stride)[:, inner[0], inner[1]]


def stitch(ws: Workspace, tile: int = 0) -> None:
    """Solve the stitch for the grid points of xy task tile ``tile`` (:meth:`Plan.tiles`) through the whole stack
    (streaming in z-blocks) and write their stitched fields. Every grid point has its own z-system, so the tiles
    are independent and together equal one solve of the whole grid."""
    params, plan = ws.params, ws.plan
    depth = plan.shape[0]
    k = models.load(ws.model).config.references
    excluded, breaks = ws.excluded(), ws.breaks()
    relative, output = ws.array("fields/relative"), ws.array("fields/stitched")
    matrices = np.asarray(ws.array("coarse/matrices")[:])
    rows, cols = plan.grid_slices(plan.tiles()[tile])
    blocks = consensus.block_plan(depth, params.stitch_block, params.stitch_overlap)
    carry: dict[int, tuple[np.ndarray, float]] = {}
    for start, stop in blocks:
        fields = np.asarray(relative[start:stop, :, rows, cols])
        solved = consensus.solve_block(fields, k, excluded, params.spring, start, breaks)
        weights = consensus.blend_weights(start, stop, depth, params.stitch_overlap)
        for offset, z in enumerate(range(start, stop)):
            value, weight = solved[offset] * weights[offset], weights[offset]
            if z in carry:
                previous, previous_weight = carry.pop(z)
                value, weight = value + previous, weight + previous_weight
            if stop < depth and z >= stop - params.stitch_overlap:
                carry[z] = (value, weight)
                continue
            correction = value / weight
            if excluded[z]:
                correction = np.zeros_like(correction)
            corner = (rows.start, cols.start)
            output[z, :, rows, cols] = coarse_composed(matrices[z], correction, params.stride, corner, plan.grid_shape)
    ws.mark_done("stitch", tile)
