"""Stage 3: one global field per section from the overlapping relative estimates.

The relative fields are reconciled in overlapping z-blocks (:mod:`emalign.consensus`),
blended across the overlaps, composed with the rigid prealignment and written to
``fields/stitched`` (the refine stage makes ``fields/global`` from them). Only one block of
fields is in memory at a time.
"""

from __future__ import annotations

import numpy as np

from emalign import consensus, models
from emalign.fields import affine_field, compose
from emalign.pipeline.store import Workspace


def stitch(ws: Workspace) -> None:
    """Solve the stitch over the whole stack (streaming in z-blocks) and write the stitched fields."""
    ws.require("estimate")
    params, plan = ws.params, ws.plan
    depth = plan.shape[0]
    k = models.load(ws.model).config.references
    excluded, breaks = ws.excluded(), ws.breaks()
    relative, output = ws.array("fields/relative"), ws.array("fields/stitched")
    matrices = np.asarray(ws.array("coarse/matrices")[:])
    grid = plan.grid_shape
    blocks = consensus.block_plan(depth, params.stitch_block, params.stitch_overlap)
    carry: dict[int, tuple[np.ndarray, float]] = {}
    for start, stop in blocks:
        solved = consensus.solve_block(np.asarray(relative[start:stop]), k, excluded, params.spring, start, breaks)
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
            coarse = affine_field(matrices[z], grid, stride=params.stride)
            output[z] = compose(coarse, correction, stride=params.stride)
    ws.mark_done("stitch", 0)
