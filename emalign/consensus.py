"""Reconcile relative section estimates into one field per section (the stitch's math).

The network, run in the symmetric layout, returns for section ``z`` the pull field that
brings it into the weighted frame of its neighbours ``z +- 1..K``. Linearised, with
``c_z`` the (unknown) correction of section ``z``:

    u_z = c_z - sum_d  w_d c_{z+d}                                  (one equation per z)

The weights ``w_d`` are those the network was trained with (nearest largest, both sides;
sections outside the stack are reflected back into it, excluded sections are dropped and
the rest renormalised). This is a discrete second-difference operator along z: a shift
shared by all sections, or one that grows linearly with z (oblique biology, a harmless
whole-stack shear), is invisible to it, while section-to-section misalignment is what it
measures. We solve, per grid point and channel, the regularised least squares

    min_c  sum_z s_z |u_z - (c_z - sum_d w_d c_{z+d})|^2  +  spring * sum_z |c_z|^2

where ``s_z`` is 0 for excluded sections, and the weak spring ties the solution to the
prealigned geometry (it fixes what the equations cannot see and damps the slow wander
that noisy relative estimates would add). Every grid point shares one ``Z x Z`` system,
so a block of sections costs one small dense solve. Long stacks are solved in
overlapping z-blocks, blended linearly across the overlaps.

A stack may fall apart into segments that share no content (lost sections, two blocks
imaged separately): ``breaks`` lists the first section of every segment after the first.
Windows never reach across a break (they reflect at it, as at the ends of the stack), so
no equation links two segments; each keeps its own prealigned frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as splinalg

PAPER_REFERENCE_WEIGHTS = (1.0, 0.5, 0.33)
"""FAEMReg's distance weights: nearest reference first."""


def reflect(index: int, length: int) -> int:
    """Mirror an index into ``[0, length)`` (``-1 -> 1``, ``length -> length - 2``)."""
    if length == 1:
        return 0
    period = 2 * (length - 1)
    index = abs(index) % period
    return period - index if index >= length else index


def segment(z: int, length: int, breaks: Sequence[int] = ()) -> tuple[int, int]:
    """``[start, stop)`` of the segment holding section ``z`` (``breaks``: first sections of later segments)."""
    start = max((b for b in breaks if b <= z), default=0)
    stop = min((b for b in breaks if b > z), default=length)
    return start, stop


def reference_weights(references: int, symmetric: bool) -> np.ndarray:
    """Weight of each depth slot of a ``2K + 1`` window in the references' frame (moving slot 0).

    FAEMReg's distance weights (nearest largest); a mirrored (sequential) window counts
    each reference once, a symmetric one splits the weight over both sides.
    """
    base = np.array(
        [PAPER_REFERENCE_WEIGHTS[min(d, len(PAPER_REFERENCE_WEIGHTS)) - 1] for d in range(1, references + 1)]
    )
    weights = np.zeros(2 * references + 1)
    for d in range(1, references + 1):
        if symmetric:
            weights[references - d] = weights[references + d] = base[d - 1] / 2
        else:
            weights[references - d] = base[d - 1]
    return weights / weights.sum()


def neighbour_indices(z: int, length: int, references: int, breaks: Sequence[int] = ()) -> list[int]:
    """The stack indices a symmetric window around ``z`` shows, depth order, reflected at the
    ends of the stack and at breaks."""
    start, stop = segment(z, length, breaks)
    return [start + reflect(z + d - start, stop - start) for d in range(-references, references + 1)]


def window_weights(
    z: int, length: int, references: int, excluded: np.ndarray, breaks: Sequence[int] = ()
) -> dict[int, float]:
    """``{section: weight}`` of the frame the network aligns section ``z`` to.

    Excluded sections get no weight (they are blanked in the network's input) and the
    remaining weights are renormalised; an empty dict means no usable reference.
    """
    slots = reference_weights(references, symmetric=True)
    weights: dict[int, float] = {}
    for slot, index in enumerate(neighbour_indices(z, length, references, breaks)):
        if slot == references or excluded[index] or index == z:
            continue
        weights[index] = weights.get(index, 0.0) + float(slots[slot])
    total = sum(weights.values())
    return {index: w / total for index, w in weights.items()} if total > 0 else {}


def consensus_matrix(
    start: int, stop: int, references: int, excluded: np.ndarray, breaks: Sequence[int] = ()
) -> np.ndarray:
    """``A`` for the sections ``[start, stop)`` of a stack of ``len(excluded)``.

    ``(A c)_z = c_z - sum_d w_d c_{z+d}``; a row is zero for an excluded section and for a
    section whose window reaches outside the block (its equation belongs to another block).
    """
    length = len(excluded)
    matrix = np.zeros((stop - start, stop - start))
    for z in range(start, stop):
        weights = window_weights(z, length, references, excluded, breaks)
        if excluded[z] or not weights or min(weights) < start or max(weights) >= stop:
            continue
        matrix[z - start, z - start] = 1.0
        for index, w in weights.items():
            matrix[z - start, index - start] -= w
    return matrix


def solve_block(
    relative: np.ndarray,
    references: int,
    excluded: np.ndarray,
    spring: float,
    start: int = 0,
    breaks: Sequence[int] = (),
) -> np.ndarray:
    """Global corrections of a block of sections from their relative estimates.

    Args:
        relative: ``(B, ...)`` relative fields ``u_z`` of sections ``start .. start + B``
            (any trailing shape: channels, grid).
        references: K, references on each side used by the estimator.
        excluded: ``(Z,)`` bool over the whole stack: sections with no estimate of their
            own (blank, damaged), blanked in the estimator's input.
        spring: weight of the pull towards the prealigned geometry (``c = 0``).
        start: index of the block's first section in the stack.
        breaks: first sections of the stack's later segments (see the module docstring).

    Returns:
        ``(B, ...)`` corrections ``c_z`` (pull, same units as ``relative``); excluded
        sections get whatever their neighbours imply, which the spring keeps near 0.
    """
    count = relative.shape[0]
    matrix = consensus_matrix(start, start + count, references, np.asarray(excluded, bool), breaks)
    normal = matrix.T @ matrix + spring * np.eye(count)
    rhs = matrix.T @ relative.reshape(count, -1).astype(np.float64)
    return np.linalg.solve(normal, rhs).reshape(relative.shape).astype(np.float32)


def smooth_trend(values: np.ndarray, stiffness: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Whittaker smoother along z.

    ``argmin_s sum_z w_z |v_z - s_z|^2 + stiffness * sum_z |s_{z-1} - 2 s_z + s_{z+1}|^2``.

    It penalises the curvature of a trajectory, not its slope: a linear trend passes
    unchanged, independent per-section jitter is removed. ``values (Z, ...)``; weights
    ``(Z,)`` (0 for sections to ignore). Returns the smooth trend, same shape.
    """
    length = values.shape[0]
    w = np.ones(length) if weights is None else np.asarray(weights, float)
    if length < 3:
        return np.repeat(np.average(values, axis=0, weights=w if w.sum() > 0 else None)[None], length, 0)
    second = sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(length - 2, length))
    system = (sparse.diags(w) + stiffness * (second.T @ second)).tocsc()
    rhs = w[:, None] * values.reshape(length, -1)
    return np.asarray(splinalg.spsolve(system, rhs)).reshape(values.shape)


WANDER_PER_MISFIT = 20.0
"""How far the step variance of a trajectory's wander may exceed its pairs' misfit (median squared residual against
the solve) in :func:`wander_stiffness`. Content that flows between sections moves every pair spanning it alike, so
pairs that agree with one another can still wander: on aligned FlyEM at 10 nm spacing the solved angles step by
88x the pairs' misfit in variance (the strains 22x), at 40 nm and on ISBI by 0.1-1x."""


def wander_stiffness(
    values: np.ndarray, residuals: np.ndarray, floor: float, weights: np.ndarray | None = None
) -> float:
    """Curvature weight (sections^4) of a solved trajectory's z-trend (:func:`smooth_trend`) that keeps the wander of
    content and accumulated pairwise noise and corrects the sections' misalignment.

    A trajectory solved from pairs is the sections' independent misalignment (variance ``s^2``) plus a wander of
    step variance ``q``, taken as :data:`WANDER_PER_MISFIT` times the pairs' misfit (the median squared residual of
    a pair against the solve). The wander outweighs the misalignment below the z-frequency ``w_c``,
    ``w_c^2 = q / s^2``, and a trend of stiffness ``l`` passes ``1 / (1 + l w^4)`` of a frequency ``w``; so
    ``l = (s^2 / q)^2``, with ``s^2`` half the mean square of the trajectory's steps between kept sections, and never
    below ``floor``. Where the pairs are about as uncertain as the sections vary (small sections, wide spacing, an
    aligned stack), the trend stays as soft as ``floor``; where they measure the variation far more precisely
    (large sections misaligned independently), slow misalignment along z is corrected too.

    Args:
        values: ``(Z, k)`` per-section parameters (a column per parameter; their squared steps are summed).
        residuals: ``(pairs,)`` each pair's misfit against the solved ``values``, in their units.
        floor: the smallest stiffness returned.
        weights: ``(Z,)`` weight of each section (0: ignore); default all 1.
    """
    wander = WANDER_PER_MISFIT * float(np.median(np.square(residuals))) if len(residuals) else 0.0
    jitter = _half_step(values, weights)
    if jitter is None or wander <= 0:
        return floor
    return max(floor, (jitter / wander) ** 2)


def _half_step(values: np.ndarray, weights: np.ndarray | None) -> float | None:
    """Half the mean squared step (summed over the columns) of a trajectory ``(Z, k)`` between the sections that
    count (``weights > 0``); None with fewer than 3 of them."""
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    kept = values if weights is None else values[np.asarray(weights) > 0]
    if len(kept) < 3:
        return None
    return float(np.mean(np.sum(np.diff(kept, axis=0) ** 2, axis=1))) / 2


MIN_FLOW_STIFFNESS = 1.0
"""The softest trend :func:`flow_stiffness` returns: it follows the trajectory over a few sections and still
bridges the sections that do not count."""


def flow_stiffness(values: np.ndarray, content_step: float, ceiling: float, weights: np.ndarray | None = None) -> float:
    """Curvature weight (sections^4) of a trajectory's z-trend (:func:`smooth_trend`) that keeps the flow of content
    between sections and corrects the sections' own misalignment.

    A trajectory of matched positions (e.g. the sections' solved centre shifts) is content that moves between
    neighbouring sections by steps of mean squared length ``c^2`` (``c = content_step``, in the values' units), plus
    each section's independent misalignment of variance ``s^2``, about half the trajectory's mean squared step. The
    misalignment outweighs the flow above the z-frequency ``w_c``, ``w_c^2 = c^2 / s^2``, and a trend of stiffness
    ``l`` passes ``1 / (1 + l w^4)`` of a frequency ``w``; so ``l = (s^2 / c^2)^2``, at most ``ceiling`` and at
    least :data:`MIN_FLOW_STIFFNESS`. The sections of an aligned stack step by no more than the content's flow, and
    the trend follows them; misaligned ones step by far more, and the trend is the ``ceiling``. ``content_step`` 0
    (or fewer than 3 sections that count): the ``ceiling``.
    """
    jitter = _half_step(values, weights)
    if jitter is None or content_step <= 0:
        return ceiling
    return float(np.clip((jitter / content_step**2) ** 2, MIN_FLOW_STIFFNESS, ceiling))


def block_plan(length: int, block: int, overlap: int) -> list[tuple[int, int]]:
    """Overlapping ``[start, stop)`` z-blocks covering ``length`` sections; neighbours share ``overlap``.

    Every block starts ``block - overlap`` after the previous one; the last may be shorter.
    """
    if length <= block:
        return [(0, length)]
    step = block - overlap
    return [(s, min(s + block, length)) for s in range(0, length - overlap, step)]


def blend_weights(start: int, stop: int, length: int, overlap: int) -> np.ndarray:
    """``(stop - start,)`` blending weights of the z-block ``[start, stop)`` of :func:`block_plan` (``length``,
    ``overlap``); over the blocks they sum to 1 at every section.

    A block's ``step = stop - start - overlap`` own sections (an inner block's; the first block owns everything
    before, the last everything after) spread their weight evenly over themselves and the ``overlap`` sections
    after, so a block's weight at its section ``j`` is the number of its own sections in ``[j - overlap, j]``
    over ``overlap + 1``: linear ramps ``(i + 1) / (overlap + 1)`` on inner faces (``i`` counted from the face)
    around a plateau of 1, or of ``step / (overlap + 1)`` where a block is shorter than ``2 * overlap + 1``
    (a section then lies in more than two blocks). With no overlap every weight is 1.
    """
    size, j = stop - start, np.arange(stop - start)
    first = 0 if start > 0 else -overlap
    last = size - overlap - 1 if stop < length else size - 1
    own = np.minimum(j, last) - np.maximum(j - overlap, first) + 1
    return np.where(own > overlap, 1.0, own * (1.0 / (overlap + 1)))


__all__ = [
    "MIN_FLOW_STIFFNESS",
    "WANDER_PER_MISFIT",
    "block_plan",
    "blend_weights",
    "consensus_matrix",
    "flow_stiffness",
    "neighbour_indices",
    "reflect",
    "segment",
    "smooth_trend",
    "solve_block",
    "wander_stiffness",
    "window_weights",
]
