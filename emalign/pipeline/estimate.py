"""Stages 1 and 2: prealignment (rigid, and the sections' scale and shear) and the network's relative fields.

prealign
    per z-block: section statistics (blank detection) and rigid pairwise estimates of each
    section against the 3 before it, at low resolution, each also refined to an affine from a
    grid of patch matches (:func:`emalign.affine.pairwise_affine`); then, once every block is done,
    one global solve (:func:`emalign.rigid.solve_rigid`) whose smooth trend along z is
    removed (:func:`emalign.rigid.detrend_rigid`; the angles' trend is softer:
    :data:`ANGLE_TREND_FACTOR`), and a strain (scale and shear) correction applied before it, as far
    as the affine pairs agree on it (:func:`solve_strain`); damaged sections are flagged, and breaks
    (no pair across them scores above the noise floor of unrelated sections: :func:`break_threshold`)
    split the stack into independently solved segments.
estimate
    per z-block: the network on the symmetric window of every section, all sections warped
    by their prealignment (each section is read and warped once per block), the fields
    subsampled onto the stride grid and written to ``fields/relative``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from emalign import affine, consensus, models, rigid
from emalign.device import resolve_device
from emalign.errors import EmalignError
from emalign.fields import affine_field, compose, warp
from emalign.inference import predict_windows
from emalign.io import Stack, check_chunk, open_stack
from emalign.masks import invalid_pixels, pieces, piecewise_field
from emalign.pipeline.store import FLAG_BLANK, FLAG_BREAK, FLAG_DAMAGED, FLAG_SKIPPED, OFFSETS, Workspace

BATCH = 2
"""Windows per network call (keeps the largest temporaries of a 512 px tile under 64 MB)."""
ANGLE_TREND_FACTOR = 0.01
"""The angles' z-trend is this much softer than the shifts' (``--trend-stiffness``). A pairwise angle is far
noisier than its share of the misalignment (40 nm FlyEM neighbours: 0.35 degrees against 1 degree of
misalignment; shifts: ~0.5 px against 15 px), so the solved angles wander by their accumulated noise; with
one stiffness for both, the prealignment applied that wander (an aligned 40 nm stack was turned by 1.4 px
rms at the image's rms radius). A softer angle trend leaves that wander uncorrected, as the shifts' trend is
(both FlyEM stacks, 4 misalignments each, rms / adj / drift px; an aligned stack moved, rms): 40 nm 3.75 /
2.12 / 3.13 -> 3.57 / 2.10 / 3.12, aligned 2.69 -> 2.51; 60 nm 7.17 / 4.84 / 6.34 -> 5.22 / 3.57 / 4.69,
aligned 4.39 -> 3.88 (one stack that the old trend lost, 20.1 px, now 6.1); 10 and 20 nm within 0.03 px.
0.003 does as well, 0.03 slightly worse."""
STRAIN_TREND_FACTOR = 0.01
"""The strain's (scale and shear: :func:`emalign.affine.strain_jitter`) z-trend, in multiples of
``--trend-stiffness``: pairwise strains are noisy like the angles, and their accumulated wander is left alone.
Measured with the full pipeline (rms / adj / drift px): procedural 24 x 1024^2, 1 % scale and 1.5-3 %
compression, 2.18 / 0.57 / 0.09 rigid, 2.12 / 0.40 / 0.05 at 0.01, 2.08 / 0.38 / 0.05 at 0.1; but at 0.1 the
jitter keeps accumulated wander that the gain (:func:`emalign.affine.strain_gain`) reads as signal, and an
aligned 40 nm FlyEM stack is moved 1.92 px rms (1.74 rigid and at 0.01)."""


def section_stats(section: np.ndarray) -> tuple[float, float]:
    """``(valid fraction, contrast)`` of a section: non-zero share, and std relative to its largest value.

    Relative to the section's own values, not to its dtype: 8-bit data stored as uint16, or any
    int64 stack, has as much contrast as the same data in uint8.
    """
    valid = section != 0
    fraction = float(valid.mean())
    if not valid.any():
        return fraction, 0.0
    values = section[valid].astype(np.float64)
    return fraction, float(values.std() / max(float(np.abs(values).max()), 1e-12))


class CheckedSections:
    """Sections ``start..stop`` of a stack, read one at a time through :func:`check_chunk` (clear errors),
    invalid pixels (:func:`emalign.masks.invalid_pixels`, with the user's mask) set to 0 (no data).

    Records :func:`section_stats` (on a ``step``-subsampled grid, before masking) of every section it reads.
    """

    def __init__(self, stack: Stack, start: int, stop: int, step: int, mask: Stack | None = None):
        self.stack, self.start, self.step, self.mask = stack, start, step, mask
        self.shape = (stop - start, *stack.shape[1:])
        self.stats: dict[int, tuple[float, float]] = {}

    def __getitem__(self, z: int) -> np.ndarray:
        raw, section = read_masked(self.stack, self.start + z, self.mask)
        self.stats[self.start + z] = section_stats(raw[:: self.step, :: self.step])
        return section


def user_mask(ws: Workspace, stack: Stack) -> Stack | None:
    """The user's mask stack (``--mask``), checked against the input's shape; None without one."""
    if not ws.params.mask:
        return None
    mask = open_stack(ws.params.mask)
    if mask.shape != stack.shape:
        raise EmalignError(f"{ws.params.mask}: mask of shape {mask.shape} does not match the stack's {stack.shape}")
    return mask


def read_masked(stack: Stack, z: int, mask: Stack | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Section ``z`` as read, and as float32 with its invalid pixels (detected, and the user's ``mask``) at 0."""
    raw = check_chunk(stack, z)
    section = raw.astype(np.float32)
    section[invalid_pixels(raw, None if mask is None else check_chunk(mask, z))] = 0
    return raw, section


def prealign_block(ws: Workspace, stack: Stack, index: int) -> None:
    """Statistics and pairwise estimates of the sections of block ``index``: rigid (``coarse/pairs``), and the
    same pairs refined to affines (``coarse/affine``)."""
    start, stop = ws.plan.blocks()[index]
    params = ws.params
    step = params.coarse_downsample
    first = max(start - max(OFFSETS), 0)
    sections = CheckedSections(stack, first, stop, step, user_mask(ws, stack))
    # one refinement step: the refine stage corrects what a second would (and more), at a third less time
    unrelated: dict[int, float] = {}
    pairs = rigid.pairwise_rigid(
        sections,
        OFFSETS,
        downsample=step,
        max_rotation_deg=params.max_rotation_deg,
        refine_steps=1,
        unrelated=unrelated,
        second_opinion=rigid.SECOND_OPINION_MARGIN,
    )
    ws.array("sections/stats")[start:stop] = np.array(
        [(*sections.stats[z], unrelated.get(z - first, np.nan)) for z in range(start, stop)]
    )
    ws.array("coarse/pairs")[start:stop] = pair_table(pairs, first, start, stop)
    ws.array("coarse/affine")[start:stop] = pair_table(
        affine.pairwise_affine(sections, pairs, step), first, start, stop
    )
    ws.mark_done("prealign", index)


def pair_table(pairs: list[tuple[int, int, np.ndarray, float]], first: int, start: int, stop: int) -> np.ndarray:
    """``(stop - start, len(OFFSETS), 7)`` rows of :func:`solve_pairs`'s table from the output of
    :func:`emalign.rigid.pairwise_rigid` run on the sections ``first..stop`` (pairs before ``start`` dropped)."""
    table = np.full((stop - start, len(OFFSETS), 7), np.nan)
    for z, j, matrix, score in pairs:
        z, j = z + first, j + first
        if z >= start:
            table[z - start, OFFSETS.index(z - j)] = [*matrix.ravel(), score]
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


def break_threshold(neighbours: float, unrelated: np.ndarray, bad: np.ndarray) -> float:
    """The score that pairs across a break stay under: half the typical ``neighbours`` score, and no more
    than the noise floor, the median + 3 robust sigmas of the ``unrelated`` scores (``(Z,)``, sections
    against their turned neighbour, NaN where there is none; ``bad`` sections left out).

    At wide z-spacing real neighbours score little above unrelated sections (60 nm FlyEM: median 0.25,
    weakest 0.12, unrelated 0.09 +- 0.007), and half the median alone would cut the stack apart.
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
    best = _best_scores(scores)
    typical = np.median(best[flags == 0]) if (flags == 0).any() else 0.0
    flags[(flags == 0) & (best < 0.25 * typical)] |= FLAG_DAMAGED
    bad = flags != 0
    neighbours = adjacent_score(scores[:, 0], bad)
    breaks = find_breaks(scores, bad, break_threshold(neighbours, stats[:, 2], bad)) if neighbours is not None else []
    flags[breaks] |= FLAG_BREAK
    strain = np.asarray(ws.array("coarse/affine")[:])
    shape, stiffness = ws.plan.shape[1:], ws.params.trend_stiffness
    ws.array("coarse/matrices")[:] = solve_pairs(table, bad, breaks, shape, stiffness, strain_table=strain)
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
    trend_stiffness: float,
    strain_table: np.ndarray | None = None,
) -> np.ndarray:
    """Per-section transforms ``(Z, 2, 3)`` from a table of pairwise estimates, segment by segment: rigid, and
    with ``strain_table`` a strain correction applied before each (:func:`solve_strain`).

    Args:
        table: ``(Z, len(OFFSETS), 7)``: ``[z, i]`` the pull matrix (6) and score of the pair
            ``(z, z - OFFSETS[i])``, NaN where there is no pair.
        bad: ``(Z,)`` sections whose pairs do not count; they get the identity.
        breaks: first sections of the later segments (no pair crosses a break).
        shape: ``(Y, X)`` of the sections.
        trend_stiffness: the shifts' ``stiffness`` in :func:`emalign.rigid.detrend_rigid`; the angles'
            is :data:`ANGLE_TREND_FACTOR` times it.
        strain_table: the same pairs as affine matrices (``coarse/affine``), or None (rigid only).
    """
    depth = len(table)
    matrices = np.tile(np.eye(2, 3), (depth, 1, 1))
    for start, stop in zip([0, *breaks], [*breaks, depth], strict=True):
        if stop - start > 1:
            solved = rigid.solve_rigid(stop - start, segment_pairs(table, bad, start, stop), shape)
            weights = (~bad[start:stop]).astype(float)
            angle_stiffness = trend_stiffness * ANGLE_TREND_FACTOR
            matrices[start:stop] = rigid.detrend_rigid(solved, shape, trend_stiffness, weights, angle_stiffness)
            if strain_table is not None:
                pairs = segment_pairs(strain_table, bad, start, stop)
                strain = solve_strain(pairs, stop - start, shape, trend_stiffness, weights)
                matrices[start:stop] = affine.apply_strain(matrices[start:stop], strain, shape)
    matrices[bad] = np.eye(2, 3)
    return matrices


def solve_strain(
    pairs: list[tuple[int, int, np.ndarray, float]],
    depth: int,
    shape: tuple[int, int],
    trend_stiffness: float,
    weights: np.ndarray,
) -> np.ndarray:
    """``(depth, 2, 2)`` strain corrections of one segment: the jitter of the solved affines' strain about its
    z-trend (:func:`emalign.affine.strain_jitter`, stiffness :data:`STRAIN_TREND_FACTOR` times
    ``trend_stiffness``), scaled by :func:`emalign.affine.strain_gain` (0 where the pairs do not agree on it).

    Args:
        pairs: ``(z, j, affine matrix, score)`` in the segment's indices; score 0 for pairs that do not count.
        weights: ``(depth,)`` 1 for good sections, 0 for bad ones.
    """
    solved = affine.solve_affine(depth, pairs, shape)
    jitter = affine.strain_jitter(solved, trend_stiffness * STRAIN_TREND_FACTOR, weights)
    scored = [p for p in pairs if p[3] > 0]
    gain = affine.strain_gain(jitter[weights > 0], affine.strain_residuals(solved, scored, shape), shape)
    return np.eye(2) + gain * (jitter - np.eye(2))


def smooth_field(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a ``(2, gy, gx)`` field over y, x (sigma in grid cells; 0: unchanged)."""
    return ndimage.gaussian_filter(field, (0, sigma, sigma), mode="nearest") if sigma > 0 else field


@functools.lru_cache(maxsize=4)
def _cached_model(name: str, device: str, stamp: float) -> models.FAEMReg:
    return models.load(name, resolve_device(device))


def _model(name: str, device: str) -> models.FAEMReg:
    """The network, loaded once per process (again when its checkpoint file changes, e.g. re-adapted)."""
    path = Path(name)
    return _cached_model(name, device, path.stat().st_mtime if path.is_file() else 0.0)


def _piece_field(
    model: models.FAEMReg, window: np.ndarray, piece: np.ndarray, device: torch.device, params
) -> np.ndarray:
    """Field ``(2, Y, X)`` of one piece of a cracked moving section (the middle of ``window``), the rest
    blanked. A piece can sit further from its neighbours than the whole section's rigid fit suggests,
    so the estimate is refined once: the piece is warped by the first field and matched again."""
    k = len(window) // 2
    window = window.copy()
    moving = window[k] * piece
    window[k] = moving
    first = predict_windows(model, window[None], device, tile=params.tile, halo=params.halo)[0]
    window[k] = warp(moving, first)
    second = predict_windows(model, window[None], device, tile=params.tile, halo=params.halo)[0]
    return compose(first, second)


def estimate_block(ws: Workspace, stack: Stack, index: int, device: str = "auto") -> None:
    """Relative fields of the sections of block ``index`` (symmetric windows, prealigned)."""
    start, stop = ws.plan.blocks()[index]
    params, plan = ws.params, ws.plan
    model = _model(ws.model, device)
    k = model.config.references
    depth = plan.shape[0]
    excluded, breaks = ws.excluded(), ws.breaks()
    matrices = np.asarray(ws.array("coarse/matrices")[:])
    mask = user_mask(ws, stack)
    windows_of = {z: consensus.neighbour_indices(z, depth, k, breaks) for z in range(start, stop)}
    prealigned = {}
    for z in sorted({i for window in windows_of.values() for i in window}):
        if excluded[z]:
            prealigned[z] = np.zeros(plan.shape[1:], np.float32)
            continue
        _, section = read_masked(stack, z, mask)
        prealigned[z] = warp(section, affine_field(matrices[z], section.shape))
    relative = ws.array("fields/relative")
    s, sigma = params.stride, params.smoothing
    dev = resolve_device(device)
    whole = []
    for z in range(start, stop):
        if excluded[z]:
            continue
        labels, count = pieces(prealigned[z] != 0)
        if count < 2:
            whole.append(z)
            continue
        window = np.stack([prealigned[i] for i in windows_of[z]])
        estimates = [_piece_field(model, window, labels == piece, dev, params) for piece in range(1, count + 1)]
        relative[z] = piecewise_field(estimates, labels, s, sigma)
    for first in range(0, len(whole), BATCH):
        batch = whole[first : first + BATCH]
        windows = np.stack([np.stack([prealigned[i] for i in windows_of[z]]) for z in batch])
        fields = predict_windows(model, windows, dev, tile=params.tile, halo=params.halo, batch=BATCH)
        for z, field in zip(batch, fields, strict=True):
            relative[z] = smooth_field(field[:, ::s, ::s], sigma / s)
    ws.mark_done("estimate", index)
