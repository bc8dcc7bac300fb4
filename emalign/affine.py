"""Affine coarse alignment: per pair of sections an affine from a grid of patch matches, per section one
affine from all pairs, and the part of it that is misalignment.

Conventions as in :mod:`emalign.rigid`: arrays ``z, y, x``; ``(2, 3)`` pull affines in ``(y, x)`` order map
output coordinates ``p`` to input coordinates ``q = A p + t``, ``aligned(p) = raw(A p + t)``
(:func:`emalign.fields.affine_field` makes them pull fields); shifts in pixels. Zero pixels are no data.

Real serial sections differ by more than a rotation: an isotropic scale (~1 %) and a compression along the
knife's path (2-3 %, in a random direction per section). A rigid prealignment leaves that to the network,
whose capture range is a few pixels: at the edge of a 1024 px section 1 % is 5 px. Here the rigidly matched
pairs are refined to affines (:func:`pairwise_affine`), one affine per section is solved from them
(:func:`solve_affine`), and its *strain* (the symmetric part ``S`` of its linear part ``A = R S``: scale and
shear, no rotation) is split, like the rigid parameters, into a smooth trend along z (content, kept) and the
per-section jitter about it (misalignment, corrected: :func:`strain_jitter`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import spsolve

from emalign import rigid
from emalign.downsample import block_mean
from emalign.patches import PatchGrid

__all__ = [
    "MIN_PATCH",
    "PATCHES_PER_SIDE",
    "apply_strain",
    "centred",
    "fit_affine",
    "match_affine",
    "pairwise_affine",
    "patch_grid",
    "polar_strain",
    "solve_affine",
    "strain_gain",
    "strain_jitter",
    "strain_residuals",
    "uncentred",
]

PATCHES_PER_SIDE = 6
"""A pair's patches are about ``1 / PATCHES_PER_SIDE`` of the section's side (half overlapping: ``2 n - 1`` per
axis), at least :data:`MIN_PATCH` px of the matched (block-mean) images. More, smaller patches sample a
section's own elastic deformation more evenly, so the fitted affine is nearer its section-wide linear part
(4 per side: benchmarks/results/scale.md, 2026-12-06, third session)."""
MIN_PATCH = 48
"""Smallest patch side, px of the matched images (smaller patches of 40 nm sections match mostly noise)."""
MIN_PATCHES = 6
"""Fewest patches with data an affine is fitted to (else the pair keeps its rigid estimate)."""
STRAIN_NOISE = 0.25
"""Noise variance of a section's solved strain jitter per median squared pair residual (:func:`strain_gain`):
0.24-0.27 in simulations (pairs at offsets 1-3 with independent strain noise, :func:`solve_affine`, then
:func:`strain_jitter`)."""


def centred(matrices: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pull affines ``(..., 2, 3)`` about the centre ``c`` of ``shape (Y, X)``: ``q - c = A (p - c) + d``.

    Returns ``(A (..., 2, 2), d (..., 2))``: ``d`` is the displacement of the centre, px.
    """
    m = np.asarray(matrices, dtype=np.float64)
    c = (np.asarray(shape[-2:], dtype=np.float64) - 1) / 2
    return m[..., :2], m[..., 2] + m[..., :2] @ c - c


def uncentred(linear: np.ndarray, displacement: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`centred`: ``(..., 2, 3)`` pull affines from ``A (..., 2, 2)`` and ``d (..., 2)``."""
    c = (np.asarray(shape[-2:], dtype=np.float64) - 1) / 2
    return np.concatenate([linear, (displacement + c - linear @ c)[..., None]], axis=-1)


def patch_grid(shape: Sequence[int]) -> PatchGrid:
    """The patches matched between two ``(Y, X)`` images (:data:`PATCHES_PER_SIDE`, :data:`MIN_PATCH`)."""
    side = min(shape[-2:])
    size = min(max(MIN_PATCH, side // PATCHES_PER_SIDE), side)
    return PatchGrid.for_shape((int(shape[-2]), int(shape[-1])), size)


def fit_affine(centres: np.ndarray, shifts: np.ndarray, scores: np.ndarray, centre: np.ndarray) -> np.ndarray | None:
    """The pull affine ``p -> p + L (p - centre) + t`` best explaining local pull shifts at ``centres``.

    Least squares with every matched patch counted the same (a correlation peak of 0 is no data), refitted up
    to 4 times without patches whose residual exceeds 3 robust sigmas (and 0.5 px):
    :func:`emalign.rigid.robust_fit`. The affine is the section-wide linear map: weighted by their peaks, a few
    richly textured patches would decide it, with their local deformation.

    Args:
        centres: ``(N, 2)`` patch centres ``(y, x)``, px.
        shifts: ``(N, 2)`` pull shifts ``moving(p + shift) ~ fixed(p)`` near each centre, px.
        scores: ``(N,)`` correlation peaks in ``[0, 1]``.
        centre: ``(2,)`` the point about which ``L`` acts, px.

    Returns:
        ``(2, 3)`` pull affine, or None with fewer than :data:`MIN_PATCHES` usable patches.
    """
    rel = np.asarray(centres, np.float64) - centre
    design = np.zeros((2 * len(rel), 6))  # params: L_yy, L_yx, L_xy, L_xx, t_y, t_x
    design[0::2, 0:2] = design[1::2, 2:4] = rel
    design[0::2, 4] = design[1::2, 5] = 1.0
    weights = (np.asarray(scores, np.float64) > 0).astype(np.float64)
    params = rigid.robust_fit(design, np.asarray(shifts, np.float64).reshape(-1), weights, MIN_PATCHES, 5)
    if params is None:
        return None
    linear = np.eye(2) + params[:4].reshape(2, 2)
    return np.concatenate([linear, (params[4:] + centre - linear @ centre)[:, None]], axis=1)


def match_affine(
    fixed: np.ndarray,
    moving: np.ndarray,
    matrix: np.ndarray,
    grid: PatchGrid | None = None,
    fixed_spectra: torch.Tensor | None = None,
    upsample: int = 10,
    steps: int = 1,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Refine a pull affine ``matrix`` (``moving(matrix @ [p, 1]) ~ fixed(p)``, e.g. a rigid estimate) to the
    affine that best explains the phase-correlation shifts of a grid of patches.

    ``moving`` is warped by ``matrix``, its patches are matched with ``fixed``'s (:class:`PatchGrid`: no-data
    patches are left out), and :func:`fit_affine`'s correction is composed after ``matrix``; ``steps`` times.

    Args:
        fixed, moving: ``(Y, X)`` images of one shape (e.g. block means); zeros are no data.
        matrix: ``(2, 3)`` pull affine in the images' pixels.
        grid: the patches (default :func:`patch_grid`).
        fixed_spectra: ``grid.spectra(fixed, device=device)``, if already computed.
        upsample: sub-pixel resolution of the matches, ``1 / upsample`` px.
        steps: match-and-fit rounds.
        device: where the patches' spectra are computed and matched (the warps stay on the CPU).

    Returns:
        ``(2, 3)`` pull affine in the images' pixels; ``matrix`` unchanged when too few patches match.
    """
    grid = grid or patch_grid(fixed.shape)
    fixed_spectra = grid.spectra(fixed, device=device) if fixed_spectra is None else fixed_spectra
    cy, cx = grid.centres()
    centres = np.stack(np.meshgrid(cy, cx, indexing="ij"), axis=-1).reshape(-1, 2)
    centre = (np.asarray(fixed.shape, np.float64) - 1) / 2
    matrix = np.asarray(matrix, np.float64)
    for _ in range(steps):
        warped = rigid._warp_affine(moving, matrix)
        shifts, peaks = grid.match(fixed_spectra, grid.spectra(warped, device=device), upsample)
        correction = fit_affine(centres, shifts.reshape(-1, 2), peaks.reshape(-1), centre)
        if correction is None:
            break
        matrix = rigid._compose(matrix, correction)
    return matrix


def pairwise_affine(
    stack: np.ndarray,
    pairs: Sequence[tuple[int, int, np.ndarray, float]],
    downsample: int,
    upsample: int = 10,
    steps: int = 1,
    device: torch.device | str = "cpu",
) -> list[tuple[int, int, np.ndarray, float]]:
    """Pairwise rigid estimates refined to affines (:func:`match_affine`) on ``downsample``-block means.

    Sections are read in order, and only those a pair still needs are held, so ``stack`` may be a lazy
    ``(Z, Y, X)`` array read section by section (like :func:`emalign.rigid.pairwise_rigid`).

    Args:
        stack: ``(Z, Y, X)`` raw sections; zeros are no data.
        pairs: ``(z, j, matrix, score)`` as from :func:`emalign.rigid.pairwise_rigid` (``j < z``; full-resolution
            pull affines with ``raw_j(p) ~ raw_z(matrix @ [p, 1])``); pairs with score 0 are kept as they are.
        downsample: block-mean factor of the matching.
        upsample, steps, device: see :func:`match_affine`.

    Returns:
        The pairs, their matrices full-resolution pull affines, in the input's order; scores unchanged.
    """
    images: dict[int, np.ndarray] = {}
    spectra: dict[int, torch.Tensor] = {}
    grid = patch_grid([n // downsample for n in stack.shape[-2:]])
    last_use: dict[int, int] = {}
    for z, j, _, _ in pairs:
        last_use[j] = max(last_use.get(j, -1), z)
        last_use[z] = max(last_use.get(z, -1), z)
    refined = list(pairs)
    for i in sorted(range(len(pairs)), key=lambda i: (pairs[i][0], -pairs[i][1])):
        z, j, matrix, score = pairs[i]
        for index in [k for k in images if last_use[k] < z]:  # no later pair needs it
            images.pop(index)
            spectra.pop(index, None)
        if score <= 0:
            continue
        for index in (j, z):
            if index not in images:
                images[index] = block_mean(np.asarray(stack[index]), downsample, nodata=True)
        if j not in spectra:
            spectra[j] = grid.spectra(images[j], device=device)
        coarse = rigid.upscale_matrix(matrix, 1 / downsample)  # the inverse of upscale_matrix(., downsample)
        coarse = match_affine(images[j], images[z], coarse, grid, spectra[j], upsample, steps, device)
        refined[i] = (z, j, rigid.upscale_matrix(coarse, downsample), score)
    return refined


def _zero_mean_least_squares(
    design: sparse.spmatrix, target: np.ndarray, weights: np.ndarray, prior: sparse.spmatrix
) -> np.ndarray:
    """Minimise ``sum weights (design x - target)^2 + x^T prior x`` for ``(2 Z, k)`` unknowns (2-vectors of ``Z``
    sections, ``k`` problems sharing the weights) under ``sum_z x_z = 0`` (Lagrange multipliers).

    The equations ``A_z = A_P A_j`` hold for ``A_z G`` with any ``G``, ``G = 0`` included: without the
    constraint a least-squares solution may shrink the whole stack toward ``A = 0`` to fit an outlier.
    """
    n = design.shape[1]
    normal = design.T @ sparse.diags(weights) @ design + prior
    constraint = sparse.kron(np.ones((1, n // 2)), np.eye(2))
    system = sparse.bmat([[normal, constraint.T], [constraint, None]], format="csc")
    rhs = np.concatenate([design.T @ (weights[:, None] * target), np.zeros((2, target.shape[1]))])
    return np.asarray(spsolve(system, rhs))[:n]


def solve_affine(
    n_sections: int,
    pairs: Sequence[tuple[int, int, np.ndarray, float]],
    shape: Sequence[int],
    reject: float = 3.0,
    min_residual: float = 1.0,
    iterations: int = 10,
) -> np.ndarray:
    """Per-section affines that best agree with redundant pairwise affine estimates.

    A pair ``(z, j, P, score)`` asks ``M_z = P M_j`` (homogeneous ``3 x 3``). About the image centre
    (:func:`centred`) this is ``A_z - A_P A_j = 0`` and ``d_z - A_P d_j = d_P``: linear in the 6 unknowns of
    each section, and the same ``v_z - A_P v_j`` for each column of ``A`` and for ``d``
    (:func:`emalign.rigid.pair_design`). Solved like :func:`emalign.rigid.solve_rigid`: weights
    ``score^2 / (1 - score^2)``, a negligible first-difference prior along z toward the identity, robust
    Cauchy re-weighting and offset-class balancing on a pair's residual (px: the RMS over the image of the
    displacement by which ``M_z`` and ``P M_j`` differ). Gauge (a constraint of the solve): the mean linear
    part is the identity and the mean centre displacement zero.

    Args:
        n_sections: ``Z``.
        pairs: ``(z, j, matrix, score)``, ``matrix`` a full-resolution pull affine with
            ``raw_j(p) ~ raw_z(matrix @ [p, 1])`` (as from :func:`pairwise_affine`).
        shape: full-resolution ``(Y, X)``.
        reject, min_residual, iterations: see :func:`emalign.rigid.solve_rigid`.

    Returns:
        ``(Z, 2, 3)`` pull affines ``aligned_z = raw_z o M_z``, all into one common frame.
    """
    moving, fixed = rigid.pair_sections(pairs)
    weights, scale = rigid._match_weights(np.array([float(p[3]) for p in pairs], float))
    scale = float(scale)
    linear, shift = centred(np.array([p[2] for p in pairs], float).reshape(-1, 2, 3), shape)
    spread = np.asarray(shape[-2:], np.float64) / np.sqrt(12)  # RMS offset of the image's pixels from the centre
    # Unknowns per section: the columns of A - I and d; targets: the columns of A_P - I and d_P.
    target = np.stack([(linear - np.eye(2))[:, :, 0], (linear - np.eye(2))[:, :, 1], shift], axis=-1).reshape(-1, 3)
    design = rigid.pair_design(n_sections, moving, fixed, linear)
    difference = rigid._incidence(n_sections, np.arange(1, n_sections), np.arange(n_sections - 1))
    prior = sparse.kron(scale * 1e-4 * difference.T @ difference, np.eye(2))
    robust = weights.copy()
    for _ in range(iterations + 1):
        solution = _zero_mean_least_squares(design, target, np.repeat(robust, 2), prior)
        error = (design @ solution - target).reshape(-1, 2, 3)  # (pairs, (y, x), (column y, column x, d))
        residual = np.sqrt((error[:, :, 2] ** 2).sum(1) + ((error[:, :, :2] * spread) ** 2).sum((1, 2)))
        balanced = weights * rigid._offset_balance(moving - fixed, residual, weights, min_residual)
        reweighted = rigid._cauchy_reweight(balanced[:, None], robust[:, None], residual[:, None], reject, min_residual)
        if reweighted is None:
            break
        robust = reweighted[:, 0]
    solution = solution.reshape(n_sections, 2, 3)
    a, d = np.eye(2) + solution[:, :, :2], solution[:, :, 2]
    return uncentred(a, d, shape)


def polar_strain(matrices: np.ndarray) -> np.ndarray:
    """The strain ``S`` of linear parts ``A = R S`` (``R`` a rotation, ``S`` symmetric positive definite: scale
    and shear in the output frame, applied before the rotation), ``(..., 2, 2)`` from ``(..., 2, 2 or 3)``."""
    u, sigma, vt = np.linalg.svd(np.asarray(matrices, np.float64)[..., :2, :2])
    return np.swapaxes(vt, -1, -2) @ (sigma[..., None] * vt)


def strain_displacements(matrices: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The strain :func:`polar_strain` of affines ``(Z, 2, 2 or 3)`` as ``(Z, 3)`` px: ``s_yy``, ``s_yx``, ``s_xx``
    times their lever arms over an image of ``shape (Y, X)``, so that the squared RMS displacement of
    ``(S_a - S_b) (p - c)`` over the image is the squared distance between rows ``a`` and ``b`` (as
    :func:`strain_residuals` measures a pair)."""
    strain = polar_strain(matrices)
    spread = np.asarray(shape[-2:], np.float64) / np.sqrt(12)
    return np.stack([strain[:, 0, 0] * spread[0], strain[:, 0, 1] * np.hypot(*spread), strain[:, 1, 1] * spread[1]], 1)


def strain_jitter(
    matrices: np.ndarray, stiffness: float, weights: np.ndarray | None = None, slope: bool = False
) -> np.ndarray:
    """The per-section jitter of the strain about its smooth trend along z.

    The strain :func:`polar_strain` of each section's affine, as ``(s_yy, s_yx, s_xx)``, is a trajectory along
    z; its Whittaker trend (:func:`emalign.consensus.smooth_trend`: curvature penalised, slope free) is content
    that changes slowly through the stack (or a whole-stack distortion) and is kept (with ``slope``, less its slope:
    where the pairs measure the strains far more precisely than they vary, independent strains over a few sections
    have a slope of their own); the jitter about it is what differs from section to section: the misalignment to
    correct.

    Args:
        matrices: ``(Z, 2, 2 or 3)`` affines (their linear parts are used).
        stiffness: curvature weight of the trend (sections^4); larger is closer to a straight line.
        weights: ``(Z,)`` weight of each section in the trend (0: ignore, e.g. blank).
        slope: correct the trend's slope too.

    Returns:
        ``(Z, 2, 2)`` symmetric ``I + S_z - trend_z``.
    """
    from emalign.consensus import smooth_trend

    strain = polar_strain(matrices)
    params = np.stack([strain[:, 0, 0], strain[:, 0, 1], strain[:, 1, 1]], axis=1)
    trend = smooth_trend(params, stiffness, weights)
    if slope:
        trend -= rigid.misaligned_slope(params, trend, weights, tolerance=np.inf)
    jitter = params - trend
    return np.eye(2) + np.stack([jitter[:, [0, 1]], jitter[:, [1, 2]]], axis=1)


def strain_residuals(
    matrices: np.ndarray, pairs: Sequence[tuple[int, int, np.ndarray, float]], shape: Sequence[int]
) -> np.ndarray:
    """Per pair ``(z, j, P, score)``, how far the strain it measured is from the solved sections' (px).

    The symmetric part ``E`` of ``A_z A_j^-1 - A_P`` (linear parts, :func:`centred`), as the RMS over the
    image (``shape (Y, X)``, about its centre) of the displacement ``E (p - c)``. ``(pairs,)``.
    """
    linear = np.asarray(matrices, np.float64)[:, :, :2]
    moving, fixed = rigid.pair_sections(pairs)
    measured = np.array([p[2] for p in pairs], float).reshape(-1, 2, 3)[:, :, :2]
    error = linear[moving] @ np.linalg.inv(linear[fixed]) - measured
    error = (error + np.swapaxes(error, 1, 2)) / 2
    return np.sqrt(((error * np.asarray(shape[-2:], np.float64) / np.sqrt(12)) ** 2).sum(axis=(1, 2)))


def strain_gain(jitter: np.ndarray, residuals: np.ndarray, shape: Sequence[int]) -> float:
    """How much of the solved strain jitter to apply, in ``[0, 1]``: ``1 - noise / (noise + signal)`` (Wiener).

    The jitter's variance (px^2: RMS displacement over the image, ``shape (Y, X)``) is signal plus noise; the
    noise is :data:`STRAIN_NOISE` times the median squared :func:`strain_residuals` of the pairs: when pairs at
    different z-offsets disagree about the strain (sections far apart at wide spacing, small sections whose
    patches have little lever arm), it is not measured and not applied.

    Args:
        jitter: ``(Z, 2, 2)`` from :func:`strain_jitter` (sections that do not count left out).
        residuals: ``(pairs,)`` px, of the pairs with a score.
    """
    if not len(residuals) or not len(jitter):
        return 0.0
    spread = np.asarray(shape[-2:], np.float64) / np.sqrt(12)
    total = float(np.mean(((np.asarray(jitter) - np.eye(2)) * spread) ** 2) * 4)
    noise = STRAIN_NOISE * float(np.median(np.asarray(residuals) ** 2))
    return max(0.0, 1.0 - noise / total) if total > 0 else 0.0


def apply_strain(matrices: np.ndarray, strain: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Pull affines ``(Z, 2, 3)`` whose strain ``(Z, 2, 2)`` (about the centre of ``shape (Y, X)``) is applied
    first: ``q = M_z(c + S_z (p - c))``, so that ``M_z`` rigid gives linear part ``R_z S_z``."""
    zero = np.zeros((len(strain), 2))
    return np.stack([rigid._compose(m, s) for m, s in zip(matrices, uncentred(strain, zero, shape), strict=True)])
