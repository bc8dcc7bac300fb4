"""Stages 1 and 2: prealignment (rigid, and the sections' scale and shear) and the network's relative fields.

prealign
    per z-block: section statistics (blank detection) and rigid pairwise estimates of each
    section against the 3 before it, at low resolution, each also refined to an affine from a
    grid of patch matches (:func:`emalign.affine.pairwise_affine`); then, once every block is done,
    one global solve (:func:`emalign.rigid.solve_rigid`, from the affine pairs' angles and shifts as far as
    they agree on a strain: :func:`solve_pairs`) whose smooth trend along z is
    removed (:func:`emalign.rigid.detrend_rigid`; the angles' trend is at most as soft as
    :data:`ANGLE_TREND_FACTOR` and stiffer where the pairs measure the angles far more precisely than
    they vary: :func:`emalign.consensus.wander_stiffness`), and a strain (scale and shear) correction
    applied before it, as far as the affine pairs agree on it (:func:`solve_strain`); damaged sections are
    flagged, and breaks (no pair across them scores above the noise floor of unrelated sections:
    :func:`break_threshold`) split the stack into independently solved segments.
estimate
    per z-block and xy task tile: the network on the symmetric window of every section, all sections warped
    by their prealignment (only the tile and its halo: each section's region is read and warped once per
    task), the fields subsampled onto the stride grid, smoothed and written to ``fields/relative``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from emalign import affine, consensus, models, rigid
from emalign.device import resolve_device
from emalign.downsample import block_mean
from emalign.errors import EmalignError
from emalign.fields import affine_field, compose, warp
from emalign.inference import predict_windows, tile_span
from emalign.io import Stack, check_chunk, downsampled, open_stack
from emalign.masks import TEXTURE_BLOCK, block_contrast, invalid_pixels, pieces, piecewise_field, typical_contrast
from emalign.pipeline.plan import AlignParams, Plan
from emalign.pipeline.render import render_region
from emalign.pipeline.store import FLAG_BLANK, FLAG_BREAK, FLAG_DAMAGED, FLAG_SKIPPED, OFFSETS, Workspace

BATCH = 2
"""Windows per network call on the CPU (keeps the largest temporaries of a 512 px tile under 64 MB)."""
GPU_BATCH = 8
"""Windows per network call on a GPU (one pass at a time: :data:`emalign.inference._GPU`)."""
AFFINE_STRIDE = 256
"""Grid spacing (px) of the prealignment's affine field when a region is pulled (exact: the field is linear)."""
ANGLE_TREND_FACTOR = 0.01
"""The angles' z-trend is at most this much softer than the shifts' (``--trend-stiffness``), and stiffer where
the pairs' angles agree far more closely than the solved angles vary (:func:`emalign.consensus.wander_stiffness`:
large sections, fine spacing; a softer trend there leaves slow rotation misalignment). A pairwise angle is often far
noisier than its share of the misalignment (40 nm FlyEM neighbours: 0.35 degrees against 1 degree of
misalignment; shifts: ~0.5 px against 15 px), so the solved angles wander by their accumulated noise; with
one stiffness for both, the prealignment applied that wander to aligned stacks. A softer angle trend leaves
that wander uncorrected, as the shifts' trend is; it helps at 40 and 60 nm and changes nothing at 10 and
20 nm (figures, and the neighbouring factors tried: benchmarks/results/design_choices.md)."""
STRAIN_TREND_FACTOR = 0.01
"""The strain's (scale and shear: :func:`emalign.affine.strain_jitter`) z-trend at its softest, in multiples of
``--trend-stiffness`` (stiffer as for the angles: :func:`emalign.consensus.wander_stiffness`): pairwise strains
are often noisy like the angles, and their accumulated wander is left alone.
A stiffer trend corrects slightly more strain on misaligned stacks, but its jitter then keeps accumulated
wander that the gain (:func:`emalign.affine.strain_gain`) reads as signal, and aligned stacks are moved
(figures: benchmarks/results/design_choices.md)."""

DAMAGED_SCORE = 0.25
"""A section is damaged when its best pair scores under this share of the stack's typical best score and no pair
of it stands clear of unrelated content at any scale (:func:`matched_scores`): strain across wide sections drags
fine-scale scores to the floor while coarse structure still matches, and a damaged section is passed through
unplaced (hundreds of px off in a stack that arrived that far off)."""

MAX_DRIFT_STEPS = 4.0
"""The steepest straight drift along z that the prealignment keeps as content, in :data:`CONTENT_STEP_NM` per
section (40 nm per section at the default): the slope of a few sections' independent offsets of hundreds of px is
otherwise read as an oblique stack whenever it exceeds what their scatter about it explains."""

CONTENT_STEP_NM = 10.0
"""How far the prealignment's matches see content move between neighbouring sections (rms length of the step of a
section's solved centre shift from the one before, nm). Aligned FlyEM at 40 nm spacing steps by 12 nm (resliced
across the FIB-SEM slices) to 19 nm (as imaged, with the microscope's own jitter), at 10 nm spacing by 4.5 nm, the
5 nm mosaic by 12 nm; misaligned stacks by tens of px. The shifts' trend follows sections that step by up to about
1.4x this (:func:`emalign.consensus.flow_stiffness`: an aligned stack keeps its content's flow) and is
``--trend-stiffness`` from about 14x. 15 nm moved aligned stacks a little less but kept more of a 3-6 px
misalignment (figures: benchmarks/results/design_choices.md)."""


class CoarseSections:
    """Sections ``start..stop`` of a stack as :func:`coarse_section` gives them (``factor``-block means of the
    masked sections, read in bounded memory); records the contrast and the statistics (:func:`section_contrast`)
    of every section read."""

    def __init__(self, stack: Stack, start: int, stop: int, factor: int, mask: Stack | None = None):
        self.stack, self.start, self.factor, self.mask = stack, start, factor, mask
        self.shape = (stop - start, *(n // factor for n in stack.shape[1:]))
        self.stats: dict[int, tuple[float, float]] = {}
        self.contrast: dict[int, np.floating] = {}

    def __getitem__(self, z: int) -> np.ndarray:
        z = self.start + z
        self.contrast[z], self.stats[z] = section_contrast(self.stack, z, self.factor)
        return coarse_section(self.stack, z, self.factor, self.contrast[z], self.mask)


def user_mask(ws: Workspace, stack: Stack) -> Stack | None:
    """The user's mask stack (``--mask``), checked against the input's shape, at the working resolution of
    ``stack`` (a block is invalid where at least half of it is); None without one."""
    if not ws.params.mask:
        return None
    mask = open_stack(ws.params.mask)
    if mask.shape != ws.writer.shape:
        raise EmalignError(f"{ws.params.mask}: mask of shape {mask.shape} does not match the stack's {ws.writer.shape}")
    mask = downsampled(mask, ws.factor)
    if mask.shape != stack.shape:
        raise EmalignError(f"{ws.params.mask}: mask of shape {mask.shape} does not match the stack's {stack.shape}")
    return mask


def masked(raw: np.ndarray, user: np.ndarray | None = None) -> np.ndarray:
    """``raw (Y, X)`` as float32 with its invalid pixels (:func:`emalign.masks.invalid_pixels`) at 0."""
    section = raw.astype(np.float32)
    section[invalid_pixels(raw, user)] = 0
    return section


def read_masked(stack: Stack, z: int, mask: Stack | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Section ``z`` as read, and as float32 with its invalid pixels (detected, and the user's ``mask``) at 0."""
    raw = check_chunk(stack, z)
    return raw, masked(raw, None if mask is None else check_chunk(mask, z))


def _widened(region: tuple[slice, slice], sizes: tuple[int, ...]) -> tuple[slice, slice]:
    """``region`` widened by a few pixels (saturated runs are judged with their surroundings) and to whole
    contrast blocks (:data:`emalign.masks.TEXTURE_BLOCK`, counted from the section's corner), within the section."""
    block = TEXTURE_BLOCK
    lo = [max(0, (r.start - 4) // block * block) for r in region]
    hi = [min(n, -(-(r.stop + 4) // block) * block) for r, n in zip(region, sizes, strict=True)]
    return slice(lo[0], hi[0]), slice(lo[1], hi[1])


def _within(region: tuple[slice, slice], window: tuple[slice, slice]) -> tuple[slice, slice]:
    """Where the part ``region`` of a section lies in an array holding its part ``window``."""
    return tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(region, window, strict=True))


def read_masked_region(
    stack: Stack,
    z: int,
    region: tuple[slice, slice],
    mask: Stack | None = None,
    typical: np.floating | None = None,
) -> np.ndarray:
    """Part ``region`` (rows, cols) of section ``z`` as :func:`read_masked` gives it, reading only around it.

    The part read is widened (:func:`_widened`), so blocks and saturated runs are judged as in the whole section;
    the featureless threshold is relative to ``typical`` (the section's median block contrast:
    :func:`section_contrast`) or, without it, to the median contrast of the part read.
    """
    window = _widened(region, stack.shape[1:])
    user = None if mask is None else check_chunk(mask, z, region=window)
    raw = check_chunk(stack, z, region=window)
    section = raw.astype(np.float32)
    section[invalid_pixels(raw, user, typical)] = 0
    return section[_within(region, window)]


COARSE_TILE = 2048
"""Side (px, rounded up to whole contrast blocks and block means) of the parts a section is read in by
:func:`coarse_section`: its memory is bounded by this, not by the section."""


def _tiles(shape: tuple[int, ...], factor: int) -> list[tuple[slice, slice]]:
    """The parts of a ``shape (Y, X)`` section that :func:`coarse_section` reads one at a time: squares of
    :data:`COARSE_TILE` rounded up to a multiple of both ``factor`` and :data:`emalign.masks.TEXTURE_BLOCK`."""
    unit = math.lcm(factor, TEXTURE_BLOCK)
    side = -(-COARSE_TILE // unit) * unit
    return [
        (slice(y0, min(y0 + side, shape[0])), slice(x0, min(x0 + side, shape[1])))
        for y0 in range(0, shape[0], side)
        for x0 in range(0, shape[1], side)
    ]


def section_contrast(stack: Stack, z: int, factor: int = 1) -> tuple[np.floating, tuple[float, float]]:
    """The median block contrast of section ``z`` (:func:`emalign.masks.typical_contrast`) and its statistics
    ``(valid fraction, contrast)`` on the ``factor``-subsampled grid, before masking: the share of non-zero
    pixels, and their std relative to their largest magnitude (relative to the section's own values, not to its
    dtype: 8-bit data stored as uint16 has as much contrast as the same data in uint8); read part by part
    (:func:`_tiles`)."""
    contrasts, counts = [], []
    size = valid = 0
    total = squares = largest = 0.0
    for region in _tiles(stack.shape[1:], factor):
        window = _widened(region, stack.shape[1:])
        raw = check_chunk(stack, z, region=window)
        part = _within(region, window)
        contrast, count = block_contrast(raw, part)
        contrasts.append(contrast.ravel())
        counts.append(count.ravel())
        values = raw[part][::factor, ::factor]
        size += values.size
        values = values[values != 0].astype(np.float64)
        valid += values.size
        total, squares = total + float(values.sum()), squares + float((values**2).sum())
        largest = max(largest, float(np.abs(values).max(initial=0.0)))
    typical = typical_contrast(np.concatenate(contrasts), np.concatenate(counts))
    if not valid:
        return typical, (0.0, 0.0)
    spread = math.sqrt(max(squares / valid - (total / valid) ** 2, 0.0))
    return typical, (valid / size, spread / max(largest, 1e-12))


def coarse_section(stack: Stack, z: int, factor: int, typical: np.floating, mask: Stack | None = None) -> np.ndarray:
    """``(Y // factor, X // factor)`` float32: ``nodata`` :func:`emalign.downsample.block_mean` of section ``z`` as
    :func:`read_masked` gives it, given ``typical``, its median block contrast (:func:`section_contrast`, or
    ``sections/contrast``).

    Read part by part (:func:`_tiles`), each part masked against ``typical`` and block-averaged; the
    full-resolution section is never held.
    """
    height, width = (n // factor for n in stack.shape[1:])
    out = np.zeros((height, width), np.float32)
    for region in _tiles(stack.shape[1:], factor):
        coarse = block_mean(read_masked_region(stack, z, region, mask, typical), factor, nodata=True)
        y0, x0 = region[0].start // factor, region[1].start // factor
        out[y0 : y0 + coarse.shape[0], x0 : x0 + coarse.shape[1]] = coarse[: height - y0, : width - x0]
    return out


def prealign_block(ws: Workspace, stack: Stack, index: int, device: str = "auto") -> None:
    """Statistics and pairwise estimates of the sections of block ``index``: rigid (``coarse/pairs``), and the
    same pairs refined to affines (``coarse/affine``); the matching on ``device``."""
    start, stop = ws.plan.blocks()[index]
    params, dev = ws.params, resolve_device(device)
    step = ws.plan.coarse_factor
    first = max(start - max(OFFSETS), 0)
    sections = CoarseSections(stack, first, stop, step, user_mask(ws, stack))
    # one refinement step: the refine stage corrects what a second would (and more), at a third less time
    unrelated: dict[int, float] = {}
    margins: dict[tuple[int, int], float] = {}
    coarse_pairs = rigid.pairwise_rigid(  # on the block means: matrices in their pixels
        sections,
        OFFSETS,
        downsample=1,
        max_rotation_deg=params.max_rotation_deg,
        refine_steps=1,
        unrelated=unrelated,
        second_opinion=rigid.SECOND_OPINION_MARGIN,
        margins=margins,
        device=dev,
    )
    pairs = [(z, j, rigid.upscale_matrix(matrix, step), score) for z, j, matrix, score in coarse_pairs]
    refined = [
        (z, j, rigid.upscale_matrix(m, step), score)
        for z, j, m, score in affine.pairwise_affine(sections, coarse_pairs, 1, device=dev)
    ]
    ws.array("sections/stats")[start:stop] = np.array(
        [(*sections.stats[z], unrelated.get(z - first, np.nan)) for z in range(start, stop)]
    )
    ws.array("sections/contrast")[start:stop] = [sections.contrast[z] for z in range(start, stop)]
    ws.array("coarse/pairs")[start:stop] = pair_table(pairs, first, start, stop)
    ws.array("coarse/affine")[start:stop] = pair_table(refined, first, start, stop)
    ws.array("coarse/margins")[start:stop] = offset_table(margins, first, start, stop)
    ws.mark_done("prealign", index)


def pair_table(pairs: list[tuple[int, int, np.ndarray, float]], first: int, start: int, stop: int) -> np.ndarray:
    """``(stop - start, len(OFFSETS), 7)`` rows of :func:`solve_pairs`'s table from the output of
    :func:`emalign.rigid.pairwise_rigid` run on the sections ``first..stop`` (pairs before ``start`` dropped)."""
    return offset_table({(z, j): [*matrix.ravel(), score] for z, j, matrix, score in pairs}, first, start, stop, (7,))


def offset_table(
    values: dict[tuple[int, int], Sequence[float] | float], first: int, start: int, stop: int, shape: tuple = ()
) -> np.ndarray:
    """``(stop - start, len(OFFSETS), *shape)``: ``values[z, j]`` of the pairs of sections ``first + z`` and
    ``first + j`` in the row of section ``first + z`` and the column of its offset; NaN where there is no pair,
    pairs before ``start`` dropped."""
    table = np.full((stop - start, len(OFFSETS), *shape), np.nan)
    for (z, j), value in values.items():
        z, j = z + first, j + first
        if z >= start:
            table[z - start, OFFSETS.index(z - j)] = value
    return table


def adjacent_score(scores: np.ndarray, bad: np.ndarray) -> float | None:
    """Median score of the pairs of adjacent good sections (``scores[z]``: the pair ``(z, z - 1)``, NaN
    where there is none; ``bad`` sections' pairs left out); None when there is no such pair."""
    good = np.isfinite(scores[1:]) & ~bad[1:] & ~bad[:-1]
    return float(np.median(scores[1:][good])) if good.any() else None


def _best_scores(scores: np.ndarray) -> np.ndarray:
    """``(Z,)`` best pair score of each section, over its pairs with earlier and later sections."""
    depth = len(scores)
    best = np.zeros(depth)
    for z in range(depth):
        near = [scores[z, i] for i, k in enumerate(OFFSETS) if z - k >= 0]
        near += [scores[z + k, i] for i, k in enumerate(OFFSETS) if z + k < depth]
        best[z] = max(near, default=0.0)
    return best


def matched_scores(scores: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """``scores`` ``(Z, len(OFFSETS))`` with the pairs whose kept match stands
    :data:`emalign.rigid.SECOND_OPINION_MARGIN` times above unrelated content at its own scale (``margins``,
    ``coarse/margins``; NaN: not measured) raised to infinity: they match, however low strain or wide spacing drags
    their fine-scale score."""
    return np.where(np.nan_to_num(margins) >= rigid.SECOND_OPINION_MARGIN, np.inf, scores)


def damaged_sections(scores: np.ndarray, matched: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``(Z,)`` True for the ``candidates`` whose best pair in ``matched`` (:func:`matched_scores`) scores under
    :data:`DAMAGED_SCORE` times the candidates' typical best pair score in ``scores`` (both ``(Z, len(OFFSETS))``)."""
    typical = np.median(_best_scores(scores)[candidates]) if candidates.any() else 0.0
    return candidates & (_best_scores(matched) < DAMAGED_SCORE * typical)


def break_threshold(neighbours: float, unrelated: np.ndarray, bad: np.ndarray) -> float:
    """The score that pairs across a break stay under: half the typical ``neighbours`` score, and no more
    than the noise floor, the median + 3 robust sigmas of the ``unrelated`` scores (``(Z,)``, sections
    against their turned neighbour, NaN where there is none; ``bad`` sections left out).

    At wide z-spacing real neighbours score little above unrelated sections, and half the median alone
    would cut the stack apart (60 nm FlyEM: benchmarks/results/design_choices.md).
    """
    floor = unrelated[np.isfinite(unrelated) & ~bad & ~np.r_[True, bad[:-1]]]
    if not len(floor):
        return 0.5 * neighbours
    centre = float(np.median(floor))
    return min(0.5 * neighbours, centre + 3 * 1.4826 * float(np.median(np.abs(floor - centre))))


def find_breaks(scores: np.ndarray, bad: np.ndarray, threshold: float) -> list[int]:
    """Sections ``b`` where the stack falls apart: every pair of good sections across the gap
    between ``b - 1`` and ``b`` scores below ``threshold`` (content does not continue; the
    pipeline uses :func:`break_threshold`).

    Args:
        scores: ``(Z, len(OFFSETS))`` pair scores, ``[z, i]`` for the pair ``(z, z - OFFSETS[i])``.
        bad: ``(Z,)`` sections whose pairs do not count (blank, damaged, skipped).
        threshold: the score a real neighbour pair exceeds.
    """
    depth = len(scores)
    breaks = []
    for b in range(1, depth):
        across = [
            scores[z, i]
            for z in range(b, min(b + max(OFFSETS), depth))
            for i, k in enumerate(OFFSETS)
            if 0 <= z - k < b and not bad[z] and not bad[z - k]
        ]
        if across and max(across) < threshold:
            breaks.append(b)
    return breaks


def solve_prealignment(ws: Workspace) -> np.ndarray:
    """Flag bad sections and breaks, and solve the rigid prealignment of each segment; returns the flags."""
    ws.require("prealign")
    depth = ws.plan.shape[0]
    stats = np.asarray(ws.array("sections/stats")[:])
    table = np.asarray(ws.array("coarse/pairs")[:])
    flags = np.zeros(depth, np.uint8)
    flags[(stats[:, 0] < 0.05) | (stats[:, 1] < 1e-3)] |= FLAG_BLANK
    skipped = [z for z in ws.params.skip if 0 <= z < depth]
    flags[skipped] |= FLAG_SKIPPED
    scores = np.nan_to_num(table[..., 6])
    matched = matched_scores(scores, np.asarray(ws.array("coarse/margins")[:]))
    flags[damaged_sections(scores, matched, flags == 0)] |= FLAG_DAMAGED
    bad = flags != 0
    neighbours = adjacent_score(scores[:, 0], bad)
    breaks = find_breaks(matched, bad, break_threshold(neighbours, stats[:, 2], bad)) if neighbours is not None else []
    flags[breaks] |= FLAG_BREAK
    strain = np.asarray(ws.array("coarse/affine")[:])
    shape, stiffness = ws.plan.shape[1:], ws.params.trend_stiffness
    content_step = CONTENT_STEP_NM / (ws.resolution.pixel_nm * ws.resolution.factor)
    matrices, shift_stiffness = solve_pairs(table, bad, breaks, shape, stiffness, strain, content_step)
    ws.array("coarse/matrices")[:] = matrices
    ws.array("coarse/stiffness")[:] = shift_stiffness
    ws.array("sections/flags")[:] = flags
    return flags


def segment_pairs(
    table: np.ndarray, bad: np.ndarray, start: int, stop: int
) -> list[tuple[int, int, np.ndarray, float]]:
    """The pairs ``(z, j, matrix (2, 3), score)`` of a table (:func:`solve_pairs`) within sections ``start..stop``,
    in the segment's indices; pairs with a ``bad`` section score 0."""
    pairs = []
    for z in range(start, stop):
        for i, k in enumerate(OFFSETS):
            if z - k >= start and np.isfinite(table[z, i, 6]):
                score = 0.0 if bad[z] or bad[z - k] else table[z, i, 6]
                pairs.append((z - start, z - k - start, table[z, i, :6].reshape(2, 3), score))
    return pairs


def solve_pairs(
    table: np.ndarray,
    bad: np.ndarray,
    breaks: list[int],
    shape: tuple[int, int],
    trend_stiffness: float | np.ndarray,
    strain_table: np.ndarray | None = None,
    content_step: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-section transforms ``(Z, 2, 3)`` from a table of pairwise estimates, segment by segment: rigid, and
    with ``strain_table`` a strain correction applied before each (:func:`solve_strain`); and ``(Z,)`` the
    stiffness of the shifts' trend each section's segment was solved with.

    Where the affine pairs agree that the sections differ in strain (the strain's gain), a rigid fit to the
    patch matches is biased by it: the rigid solve then takes each pair's angle and centre shift that share of
    the way from the rigid estimate to the affine one. Where they do not agree (aligned stacks, wide spacing,
    small sections), the rigid pairs stand: their three parameters are the less noisy fit.

    Args:
        table: ``(Z, len(OFFSETS), 7)``: ``[z, i]`` the pull matrix (6) and score of the pair
            ``(z, z - OFFSETS[i])``, NaN where there is no pair.
        bad: ``(Z,)`` sections whose pairs do not count; they get the identity.
        breaks: first sections of the later segments (no pair crosses a break).
        shape: ``(Y, X)`` of the sections.
        trend_stiffness: the shifts' ``stiffness`` in :func:`emalign.rigid.detrend_rigid` (softer where the sections
            step by little more than ``content_step``: :func:`emalign.consensus.flow_stiffness`); the angles' is
            :func:`emalign.consensus.wander_stiffness` against the pairs' angle residuals, at least
            :data:`ANGLE_TREND_FACTOR` times it. ``(Z,)``: per section (a segment takes its first section's).
        strain_table: the same pairs as affine matrices (``coarse/affine``), or None (rigid only).
        content_step: how far content moves between neighbouring sections, px (rms); the shifts' trend keeps a
            straight drift of at most :data:`MAX_DRIFT_STEPS` of it per section. 0: the shifts' trend is
            ``trend_stiffness`` whatever they do, with any drift.
    """
    depth = len(table)
    matrices = np.tile(np.eye(2, 3), (depth, 1, 1))
    stiffness = np.broadcast_to(np.asarray(trend_stiffness, np.float64), (depth,)).copy()
    for start, stop in zip([0, *breaks], [*breaks, depth], strict=True):
        ceiling = float(stiffness[start])
        if stop - start > 1:
            weights = (~bad[start:stop]).astype(float)
            pairs = segment_pairs(table, bad, start, stop)
            if strain_table is not None:
                affine_pairs = segment_pairs(strain_table, bad, start, stop)
                strain, gain = solve_strain(affine_pairs, stop - start, shape, ceiling, weights)
                pairs = [
                    (z, j, rigid.toward(matrix, refined, gain, shape), score)
                    for (z, j, matrix, score), (_, _, refined, _) in zip(pairs, affine_pairs, strict=True)
                ]
            solved = rigid.solve_rigid(stop - start, pairs, shape)
            residuals = rigid.angle_residuals(solved, [p for p in pairs if p[3] > 0])
            floor = ceiling * ANGLE_TREND_FACTOR
            angle_stiffness = consensus.wander_stiffness(rigid.angles(solved), residuals, floor, weights)
            shifts = rigid.centre_shifts(solved, shape)
            stiffness[start:stop] = consensus.flow_stiffness(shifts, content_step, ceiling, weights)
            matrices[start:stop] = rigid.detrend_rigid(
                solved,
                shape,
                stiffness[start],
                weights,
                angle_stiffness,
                angle_wander=angle_stiffness <= floor,
                max_drift=MAX_DRIFT_STEPS * content_step if content_step > 0 else np.inf,
            )
            if strain_table is not None:
                matrices[start:stop] = affine.apply_strain(matrices[start:stop], strain, shape)
    matrices[bad] = np.eye(2, 3)
    return matrices, stiffness


def solve_strain(
    pairs: list[tuple[int, int, np.ndarray, float]],
    depth: int,
    shape: tuple[int, int],
    trend_stiffness: float,
    weights: np.ndarray,
) -> tuple[np.ndarray, float]:
    """``(depth, 2, 2)`` strain corrections of one segment and the gain that scaled them: the jitter of the
    solved affines' strain about its z-trend (:func:`emalign.affine.strain_jitter`; stiffness
    :func:`emalign.consensus.wander_stiffness` against the pairs' strain residuals, at least
    :data:`STRAIN_TREND_FACTOR` times ``trend_stiffness``; where stiffer, the trend's slope is corrected too), scaled
    by :func:`emalign.affine.strain_gain` (0 where the pairs do not agree on it).

    Args:
        pairs: ``(z, j, affine matrix, score)`` in the segment's indices; score 0 for pairs that do not count.
        weights: ``(depth,)`` 1 for good sections, 0 for bad ones.
    """
    solved = affine.solve_affine(depth, pairs, shape)
    scored = [p for p in pairs if p[3] > 0]
    residuals = affine.strain_residuals(solved, scored, shape)
    floor = trend_stiffness * STRAIN_TREND_FACTOR
    stiffness = consensus.wander_stiffness(affine.strain_displacements(solved, shape), residuals, floor, weights)
    jitter = affine.strain_jitter(solved, stiffness, weights, slope=stiffness > floor)
    gain = affine.strain_gain(jitter[weights > 0], residuals, shape)
    return np.eye(2) + gain * (jitter - np.eye(2)), gain


def smooth_field(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a ``(2, gy, gx)`` field over y, x (sigma in grid cells; 0: unchanged)."""
    return ndimage.gaussian_filter(field, (0, sigma, sigma), mode="nearest") if sigma > 0 else field


def working_model(model: models.FAEMReg, ratio: float) -> models.FAEMReg:
    """``model`` with its input scale multiplied by ``ratio`` (working pixel / training pixel), so it sees the
    physical resolution it was trained at; changes ``model`` in place and returns it."""
    if ratio != 1.0:
        model.config = replace(model.config, input_scale=model.config.input_scale * ratio)
    return model


@functools.lru_cache(maxsize=4)
def _cached_model(name: str, device: str, ratio: float, stamp: float) -> models.FAEMReg:
    return working_model(models.load(name, resolve_device(device)), ratio)


def _model(name: str, device: str, ratio: float = 1.0) -> models.FAEMReg:
    """The network for a working pixel ``ratio`` times its training pixel, loaded once per process (again when
    its checkpoint file changes, e.g. re-adapted)."""
    path = Path(name)
    return _cached_model(name, device, ratio, path.stat().st_mtime if path.is_file() else 0.0)


def _piece_field(
    model: models.FAEMReg,
    window: np.ndarray,
    piece: np.ndarray,
    device: torch.device,
    params: AlignParams,
    frame: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> np.ndarray:
    """Field ``(2, Y, X)`` of one piece of a cracked moving section (the middle of ``window``), the rest
    blanked. A piece can sit further from its neighbours than the whole section's rigid fit suggests,
    so the estimate is refined once: the piece is warped by the first field and matched again.
    ``frame``: see :func:`emalign.inference.predict_windows`."""
    k = len(window) // 2
    window = window.copy()
    moving = window[k] * piece
    window[k] = moving
    predict = functools.partial(predict_windows, model, device=device, tile=params.tile, halo=params.halo, frame=frame)
    first = predict(window[None])[0]
    window[k] = warp(moving, first)
    second = predict(window[None])[0]
    return compose(first, second)


class PrealignedRegions:
    """One xy region of sections warped by their prealignment (``coarse/matrices``), invalid pixels 0 (judged
    against each section's contrast: ``sections/contrast``, so a region's pixels equal the whole section's),
    excluded sections all 0; each is read once, in :func:`emalign.pipeline.render.render_region`'s strips (only the
    part of the raw section a strip pulls from, warped on ``device``), and kept until :meth:`keep_only` drops it."""

    def __init__(
        self,
        ws: Workspace,
        stack: Stack,
        origin: tuple[int, int],
        shape: tuple[int, int],
        device: torch.device | str = "cpu",
    ):
        self.stack, self.origin, self.shape, self.device = stack, origin, shape, device
        self.matrices = np.asarray(ws.array("coarse/matrices")[:])
        self.contrast = np.asarray(ws.array("sections/contrast")[:])
        self.excluded = ws.excluded()
        self.mask = user_mask(ws, stack)
        height, width = stack.shape[1:]
        self.grid = (height // AFFINE_STRIDE + 2, width // AFFINE_STRIDE + 2)  # reaches past the section's edge
        self.sections: dict[int, np.ndarray] = {}

    def __getitem__(self, z: int) -> np.ndarray:
        if z not in self.sections and self.excluded[z]:
            self.sections[z] = np.zeros(self.shape, np.float32)
        elif z not in self.sections:
            field = affine_field(self.matrices[z], self.grid, stride=AFFINE_STRIDE)
            read = functools.partial(read_masked_region, mask=self.mask, typical=self.contrast[z])
            self.sections[z] = render_region(
                self.stack, z, field, AFFINE_STRIDE, self.origin, self.shape, read=read, device=self.device
            )
        return self.sections[z]

    def window(self, indices: list[int]) -> np.ndarray:
        """``(D, h, w)``: the sections ``indices`` stacked."""
        return np.stack([self[i] for i in indices])

    def windows(self, windows: list[list[int]]) -> LazyWindows:
        """``(B, D, h, w)``: the sections of each of ``windows`` stacked, cut out only where sliced."""
        return LazyWindows(self, windows)

    def keep_only(self, indices: set[int]) -> None:
        """Forget the sections not in ``indices``."""
        for z in set(self.sections) - indices:
            del self.sections[z]


class LazyWindows:
    """``(B, D, h, w)`` windows of :class:`PrealignedRegions`' sections (``indices[b]``: window ``b``'s), stacked
    only for the part ``[batches, :, rows, cols]`` sliced (:func:`emalign.inference.predict_windows` slices one
    network tile at a time): the windows' sections are held once, not once per window."""

    def __init__(self, sections: PrealignedRegions, indices: list[list[int]]):
        self.sections, self.indices = sections, indices
        self.shape = (len(indices), len(indices[0]), *sections.shape)

    def __getitem__(self, key: tuple[slice, slice, slice, slice]) -> np.ndarray:
        batches, _, rows, cols = key
        return np.stack([[self.sections[i][rows, cols] for i in window] for window in self.indices[batches]])


@dataclass(frozen=True)
class TaskRegion:
    """What an estimate task reads for its xy tile: the region at ``origin`` (a multiple of the stride) of
    ``shape`` px, and the tile's grid points in the region's field grid (``rows``, ``cols``)."""

    origin: tuple[int, int]
    shape: tuple[int, int]
    rows: slice
    cols: slice


def task_region(plan: Plan, tile: tuple[int, int, int, int]) -> TaskRegion:
    """The region of an estimate task on ``tile`` (:meth:`Plan.tiles`): every network tile (``--tile``, cut as in
    the whole section) that reaches within the smoothing's reach (scipy's Gaussian radius) of the tile. The
    tile's smoothed field then equals the whole section's: neighbouring tiles meet without seams."""
    params, s = plan.params, plan.params.stride
    reach = int(4.0 * params.smoothing / s + 0.5) * s
    y0, x0, h, w = tile
    spans = [
        tile_span(n, params.tile, params.halo, max(a - reach, 0), min(a + m + reach, n))
        for n, a, m in zip(plan.shape[1:], (y0, x0), (h, w), strict=True)
    ]
    origin = (spans[0][0] // s * s, spans[1][0] // s * s)
    rows, cols = plan.grid_slices(tile)
    gy, gx = origin[0] // s, origin[1] // s
    return TaskRegion(
        origin,
        (spans[0][1] - origin[0], spans[1][1] - origin[1]),
        slice(rows.start - gy, rows.stop - gy),
        slice(cols.start - gx, cols.stop - gx),
    )


def estimate_block(ws: Workspace, stack: Stack, index: int, tile: int = 0, device: str = "auto") -> None:
    """Relative fields of the sections of block ``index`` (symmetric windows, prealigned) on xy task tile ``tile``.

    Works on the tile and its context (:func:`task_region`): the network's field there, subsampled onto the
    stride grid and smoothed, is written for the tile's grid points only. Holds the region of ``2K + 1 + BATCH``
    (:data:`GPU_BATCH` on a GPU) sections at most, whatever the block and section size. A section cut into pieces
    (:func:`emalign.masks.pieces`) is judged, and estimated piece by piece, within the region.
    """
    start, stop = ws.plan.blocks()[index]
    params, plan = ws.params, ws.plan
    model = _model(ws.model, device, ws.resolution.ratio)
    k = model.config.references
    excluded, breaks = ws.excluded(), ws.breaks()
    region = task_region(plan, plan.tiles()[tile])
    out_rows, out_cols = plan.grid_slices(plan.tiles()[tile])
    dev = resolve_device(device)
    sections = PrealignedRegions(ws, stack, region.origin, region.shape, dev)
    frame = (region.origin, plan.shape[1:])
    todo = [z for z in range(start, stop) if not excluded[z]]
    windows_of = {z: consensus.neighbour_indices(z, plan.shape[0], k, breaks) for z in todo}
    relative = ws.array("fields/relative")
    s, sigma = params.stride, params.smoothing
    size = GPU_BATCH if dev.type == "cuda" else BATCH

    def write(z: int, field: np.ndarray) -> None:
        relative[z, :, out_rows, out_cols] = field[:, region.rows, region.cols]

    def run(batch: list[int]) -> None:
        windows = sections.windows([windows_of[z] for z in batch])
        fields = predict_windows(model, windows, dev, tile=params.tile, halo=params.halo, batch=size, frame=frame)
        for z, field in zip(batch, fields, strict=True):
            write(z, smooth_field(field[:, ::s, ::s], sigma / s))

    batch: list[int] = []
    for position, z in enumerate(todo):
        sections.keep_only({i for later in [*batch, *todo[position:]] for i in windows_of[later]})
        labels, count = pieces(sections[z] != 0)
        if count < 2:
            batch.append(z)
            if len(batch) == size:
                run(batch)
                batch = []
            continue
        window = sections.window(windows_of[z])
        estimates = [_piece_field(model, window, labels == p, dev, params, frame) for p in range(1, count + 1)]
        write(z, piecewise_field(estimates, labels, s, sigma))
    if batch:
        run(batch)
    ws.mark_done("estimate", plan.task_index(index, tile))
