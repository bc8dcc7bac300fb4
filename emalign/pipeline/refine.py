"""Stage 4: a translation pass on the stitched sections, against slow wander along z.

Rigid matches between *misaligned* sections are biased (each section's own no-data border and
window pull an estimate toward no motion), and the network sees only a few neighbours at a time,
so some wander along z survives the stitch. Once stitched, neighbours share their frame: matched
again, translation only, and solved like the prealignment, they give one shift per section that
removes most of it (figures: benchmarks/results/design_choices.md).

refine
    per z-block: every section warped by its stitched field and phase-correlated (translation
    only, at :attr:`emalign.pipeline.plan.Plan.coarse_factor`) with the 3 before it; once every block is done, one solve
    (:func:`emalign.pipeline.estimate.solve_pairs`: breaks, bad sections and the z-trend handled
    as in the prealignment) whose shifts are composed into ``fields/refined`` (the polish stage makes
    ``fields/global`` from them).

The trend along z is the prealignment's shift trend (``coarse/stiffness``): stiff where the raw sections were
misaligned, soft where they stepped no further than their content flows (an aligned stack; after the stitch every
stack steps that little, so the refine stage's own shifts cannot tell). At fine z-spacing (:func:`fine_spacing`:
neighbours nearly the same image) the content drifts far less per section, so the trend kept is
:data:`FINE_TREND_FACTOR` times stiffer: the prealignment's trend, fitted to misaligned sections, takes some true
misalignment with it, and this puts it back. At 40 nm a stiffer trend moves an aligned stack more and misaligned
ones no better, so it is kept for fine spacing (figures: benchmarks/results/design_choices.md).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from emalign import rigid
from emalign.device import resolve_device
from emalign.fields import affine_field, compose, resample, warp
from emalign.io import Stack
from emalign.pipeline.estimate import (
    adjacent_score,
    coarse_section,
    pair_table,
    read_masked_region,
    solve_pairs,
    user_mask,
)
from emalign.pipeline.render import render_region
from emalign.pipeline.store import OFFSETS, Workspace

FINE_MIN_PEAK = 0.62
"""Median correlation peak of adjacent refined sections from which a stack counts as finely spaced: between
what the FlyEM stacks show at 20 nm and at 30 nm (benchmarks/results/design_choices.md)."""
FINE_TREND_FACTOR = 10.0
"""The refine stage's trend stiffness at fine z-spacing, in multiples of the prealignment's shift trend."""


def adjacent_peak(ws: Workspace) -> float:
    """Median correlation peak of adjacent good sections after the refine stage's matching (0 when none)."""
    peak = adjacent_score(np.asarray(ws.array("refine/pairs")[:, 0, 6]), ws.excluded())
    return 0.0 if peak is None else peak


def fine_spacing(ws: Workspace) -> bool:
    """Whether adjacent sections are nearly the same image (:func:`adjacent_peak` at least :data:`FINE_MIN_PEAK`)."""
    return adjacent_peak(ws) >= FINE_MIN_PEAK


class WarpedSections:
    """Sections ``start..stop`` as ``factor``-block means warped by their fields in the workspace array
    ``fields`` (invalid pixels and excluded sections at 0): block mean first (read part by part and masked
    against the section's stored contrast: :func:`emalign.pipeline.estimate.coarse_section`), then the warp on
    the coarse grid, a ``factor^2`` cheaper warp than at full resolution; warps on ``device``."""

    def __init__(
        self,
        ws: Workspace,
        stack: Stack,
        start: int,
        stop: int,
        factor: int,
        fields: str,
        device: torch.device | str = "cpu",
    ):
        self.ws, self.stack, self.start, self.factor, self.device = ws, stack, start, factor, device
        self.shape = (stop - start, *(n // factor for n in stack.shape[1:]))
        self.excluded, self.mask = ws.excluded(), user_mask(ws, stack)
        self.fields = ws.array(fields)
        self.contrast = np.asarray(ws.array("sections/contrast")[:])

    def region(self, index: int, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
        """The ``shape`` region at ``origin`` of section ``index`` warped at full resolution (``factor`` 1), read
        around it only: the pixels of the whole warped section there."""
        z = self.start + index
        if self.excluded[z]:
            return np.zeros(shape, np.float32)
        read = functools.partial(read_masked_region, mask=self.mask, typical=self.contrast[z])
        field, stride = np.asarray(self.fields[z]), self.ws.params.stride
        return render_region(self.stack, z, field, stride, origin, shape, read, self.device)

    def __getitem__(self, index: int) -> np.ndarray:
        z = self.start + index
        if self.excluded[z]:
            return np.zeros(self.shape[1:], np.float32)
        coarse = coarse_section(self.stack, z, self.factor, self.contrast[z], self.mask)
        # coarse pixel i sits at full-resolution factor * i + (factor - 1) / 2; fields are in full-resolution px
        centre = ((self.factor - 1) / 2,) * 2
        stride = self.ws.params.stride
        field = resample(np.asarray(self.fields[z]), stride, self.factor, coarse.shape, centre, self.device)
        return warp(coarse, field / self.factor, device=self.device)


def refine_block(ws: Workspace, stack: Stack, index: int, device: str = "auto") -> None:
    """Pairwise translations of the stitched sections of block ``index`` (against the 3 before each), warped and
    matched on ``device``."""
    start, stop = ws.plan.blocks()[index]
    first = max(start - max(OFFSETS), 0)
    factor, dev = ws.plan.coarse_factor, resolve_device(device)
    sections = WarpedSections(ws, stack, first, stop, factor, "fields/stitched", dev)
    matches = rigid.pairwise_rigid(sections, OFFSETS, downsample=1, max_rotation_deg=0, device=dev)
    pairs = [(z, j, rigid.upscale_matrix(matrix, factor), score) for z, j, matrix, score in matches]
    ws.array("refine/pairs")[start:stop] = pair_table(pairs, first, start, stop)
    ws.mark_done("refine", index)


def solve_refinement(ws: Workspace) -> None:
    """Solve the shifts of every section and write ``fields/refined`` (stitched field, then the shift);
    marks the solve done (the last element of ``stages/refine``)."""
    params, plan = ws.params, ws.plan
    excluded = ws.excluded()
    table = np.asarray(ws.array("refine/pairs")[:])
    stiffness = np.asarray(ws.array("coarse/stiffness")[:]) * (FINE_TREND_FACTOR if fine_spacing(ws) else 1.0)
    matrices, _ = solve_pairs(table, excluded, list(ws.breaks()), plan.shape[1:], stiffness)
    stitched, output = ws.array("fields/stitched"), ws.array("fields/refined")
    for z in range(plan.shape[0]):
        field = np.asarray(stitched[z])
        if not excluded[z]:
            field = compose(field, affine_field(matrices[z], plan.grid_shape, stride=params.stride), params.stride)
        output[z] = field
    ws.mark_done("refine", len(plan.blocks()))
