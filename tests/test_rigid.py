"""Rigid registration: phase correlation, rigid estimates, the chain baseline and the redundant solve."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from emalign import fields, rigid
from emalign.synth import em_texture

FLYEM = Path(__file__).resolve().parents[2] / "shared" / "data" / "flyem_medulla_training_sample1.tif"


def texture(shape: tuple[int, ...], seed: int = 0, sigma: tuple[float, ...] | float = 2.0) -> np.ndarray:
    """Smoothed random texture (2D image or 3D volume whose z-neighbours differ), values in 1..255."""
    rng = np.random.default_rng(seed)
    fine = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    coarse = ndimage.gaussian_filter(rng.standard_normal(shape), np.asarray(sigma) * 4)
    image = fine / fine.std() + 1.5 * coarse / coarse.std()
    return np.clip(128 + 30 * image, 1, 255).astype(np.float32)


def pull(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` pulled by a ``(2, 3)`` affine through emalign.fields (zeros outside)."""
    return fields.warp(image, fields.affine_field(matrix, image.shape))


def inverse(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]


def compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Warping by ``first`` then by ``second``."""
    return (np.vstack([first, [0, 0, 1]]) @ np.vstack([second, [0, 0, 1]]))[:2]


def displacement_error(estimated: np.ndarray, expected: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest difference (px) of two affines over the image."""
    difference = rigid.affine_fields(np.stack([estimated, expected]), shape, stride=8)
    return float(np.abs(difference[0] - difference[1]).max())


def angle_error(estimated: np.ndarray, expected: np.ndarray) -> float:
    """Rotation (degrees) of ``estimated`` relative to ``expected``."""
    relative = compose(inverse(expected), estimated)
    return float(np.rad2deg(np.arctan2(relative[1, 0], relative[0, 0])))


def test_phase_correlation_recovers_subpixel_shift():
    fixed = texture((128, 128))
    for true in [(3.3, -5.7), (-0.45, 0.8), (40.25, -35.5)]:  # the last is about a third of the image
        moving = fields.warp(fixed, np.broadcast_to(np.array(true, np.float32)[:, None, None], (2, 128, 128)))
        # moving(p) = fixed(p + true), so moving(p - true) = fixed(p): the pull shift is -true.
        shift, peak = rigid.phase_correlation(fixed, moving)
        np.testing.assert_allclose(shift, -np.array(true), atol=0.05)
        assert peak > 0.3


def test_phase_correlation_ignores_zero_border():
    image = texture((160, 160), seed=1)
    true = np.array([6.4, -9.3])
    moving = pull(image, rigid.rigid_matrix(0.0, -true, image.shape))
    fixed = image.copy()
    # The same no-data frame in both: unmasked, its edges would correlate best at zero shift.
    for im in (fixed, moving):
        im[:30], im[:, -25:] = 0, 0
    shift, peak = rigid.phase_correlation(fixed, moving)
    np.testing.assert_allclose(shift, true, atol=0.1)
    # Explicit masks exclude valid-looking pixels too.
    mask = np.ones(image.shape, bool)
    mask[100:] = False
    masked_shift, _ = rigid.phase_correlation(fixed, moving, mask_fixed=mask, mask_moving=mask)
    np.testing.assert_allclose(masked_shift, true, atol=0.15)


def test_phase_correlation_peak_is_a_confidence():
    image = texture((128, 128), seed=2)
    assert rigid.phase_correlation(image, image)[1] == pytest.approx(1.0, abs=1e-3)
    assert rigid.phase_correlation(image, texture((128, 128), seed=3))[1] < 0.15
    assert rigid.phase_correlation(image, np.zeros_like(image)) == (pytest.approx([0, 0]), 0.0)


def test_estimate_rigid_recovers_rotation_and_shift():
    volume = texture((3, 192, 192), seed=4, sigma=(1.5, 2, 2))  # neighbours share coarse structure only
    truth = rigid.rigid_matrix(3.2, (12.5, -7.25), (192, 192))
    for moving_slice in (0, 1):
        estimate = rigid.estimate_rigid(volume[0], pull(volume[moving_slice], truth))
        expected = inverse(truth)
        assert abs(angle_error(estimate.matrix, expected)) < 0.05
        assert displacement_error(estimate.matrix, expected, (192, 192)) < 0.3
        angle, shift = rigid._angle_and_shift(expected, (192, 192))
        assert estimate.angle_deg == pytest.approx(angle, abs=0.05)
        np.testing.assert_allclose(estimate.shift, shift, atol=0.2)
        np.testing.assert_allclose(estimate.matrix, rigid.rigid_matrix(estimate.angle_deg, estimate.shift, (192, 192)))
        assert estimate.score > 0.3


@pytest.mark.parametrize(("shape", "downsample"), [((192, 192), 4), ((191, 257), 3)])
def test_estimate_rigid_downsampled_is_in_full_resolution_pixels(shape, downsample):
    image = texture(shape, seed=5)
    truth = rigid.rigid_matrix(-2.0, (20.0, 9.0), image.shape)
    estimate = rigid.estimate_rigid(image, pull(image, truth), downsample=downsample)
    assert displacement_error(estimate.matrix, inverse(truth), image.shape) < 0.4


@pytest.mark.skipif(not FLYEM.exists(), reason=f"FlyEM sample not found at {FLYEM}")
def test_estimate_rigid_on_flyem_neighbours():
    tifffile = pytest.importorskip("tifffile")
    volume = tifffile.imread(FLYEM).astype(np.float32)
    shape = volume.shape[1:]
    rng = np.random.default_rng(0)
    for z in (30, 120, 200):
        fixed, neighbour = volume[z], volume[z + 4]  # 40 nm apart: the content changes
        truth = rigid.rigid_matrix(rng.uniform(-4, 4), rng.uniform(-20, 20, 2), shape)
        # Oblique neurites move between sections, so the raw pair is itself ~1-2 px "misaligned";
        # the estimate of the warped pair must be that raw estimate, moved by the known warp.
        raw = rigid.estimate_rigid(fixed, neighbour)
        assert abs(raw.angle_deg) < 1.0 and np.abs(raw.shift).max() < 4
        warped = rigid.estimate_rigid(fixed, pull(neighbour, truth))
        expected = compose(inverse(truth), raw.matrix)
        assert abs(angle_error(warped.matrix, expected)) < 0.15
        assert np.abs(warped.shift - rigid._angle_and_shift(expected, shape)[1]).max() < 0.4
        assert 0.1 < warped.score < 0.9


def test_rigid_chain_undoes_known_per_section_motion():
    image = texture((128, 128), seed=6)
    rng = np.random.default_rng(1)
    motions = [rigid.rigid_matrix(rng.normal(0, 2), rng.normal(0, 8, 2), image.shape) for _ in range(6)]
    stack = np.stack([pull(image, m) for m in motions])  # raw_z(p) = image(M_z p)
    chain = rigid.rigid_chain(stack)
    np.testing.assert_allclose(chain[0], np.eye(2, 3))
    # aligned_z(p) = raw_z(T_z p) = image(M_z T_z p): M_z T_z must be one common map, M_0.
    for motion, transform in zip(motions, chain, strict=True):
        assert displacement_error(compose(motion, transform), motions[0], image.shape) < 0.3


def test_affine_fields_are_per_section_pull_fields():
    matrices = np.stack([rigid.rigid_matrix(a, (a, -a), (50, 40)) for a in (0.0, 1.0, -3.0)])
    grid = rigid.affine_fields(matrices, (50, 40), stride=8)
    assert grid.shape == (3, 2, 7, 5) and grid.dtype == np.float32
    np.testing.assert_allclose(grid[2], fields.affine_field(matrices[2], (7, 5), stride=8))
    np.testing.assert_allclose(rigid.affine_fields(matrices, (50, 40))[1], fields.affine_field(matrices[1], (50, 40)))


def misaligned_stack(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sections of a textured volume, each moved by an independent rigid motion ``M_z``."""
    volume = texture((n, size, size), seed=seed, sigma=(2.0, 2.0, 2.0))
    rng = np.random.default_rng(seed)
    motions = np.stack([rigid.rigid_matrix(rng.normal(0, 1), rng.normal(0, 15, 2), (size, size)) for _ in range(n)])
    return np.stack([pull(volume[z], motions[z]) for z in range(n)]), motions


def residual_spread(transforms: np.ndarray, motions: np.ndarray, shape: tuple[int, int]) -> float:
    """RMS over sections of the residual field ``M_z T_z - I`` after removing its mean over z (px)."""
    residual = rigid.affine_fields([compose(m, t) for m, t in zip(motions, transforms, strict=True)], shape, 16)
    return float(np.sqrt(((residual - residual.mean(axis=0)) ** 2).sum(axis=1).mean()))


def test_pairwise_rigid_and_solve_align_a_misaligned_stack():
    stack, motions = misaligned_stack(10, 192, seed=7)
    pairs = rigid.pairwise_rigid(stack, offsets=(1, 2), downsample=2)
    assert [(z, j) for z, j, _, _ in pairs][:3] == [(1, 0), (2, 1), (2, 0)]
    for z, j, matrix, score in pairs:
        # raw_j(p) ~ raw_z(P p) with raw_z = volume_z o M_z: P = M_z^-1 M_j.
        assert displacement_error(matrix, compose(inverse(motions[z]), motions[j]), (192, 192)) < 1.5
        assert score > 0.3
    transforms = rigid.solve_rigid(10, pairs, (192, 192))
    assert residual_spread(transforms, motions, (192, 192)) < 0.6
    assert residual_spread(np.tile(np.eye(2, 3), (10, 1, 1)), motions, (192, 192)) > 10


def test_blank_section_is_bridged():
    stack, motions = misaligned_stack(8, 128, seed=8)
    stack[4] = 0
    pairs = rigid.pairwise_rigid(stack, offsets=(1, 2, 3), downsample=2)
    assert all(score == 0 for z, j, _, score in pairs if 4 in (z, j))
    assert all(score > 0.2 for z, j, _, score in pairs if 4 not in (z, j))
    transforms = rigid.solve_rigid(8, pairs, (128, 128))
    keep = [z for z in range(8) if z != 4]
    assert residual_spread(transforms[keep], motions[keep], (128, 128)) < 0.6
    assert np.isfinite(transforms).all()


def shifted_copies(
    rng: np.random.Generator, size: int, smooth: float, pad: int, reach: int, count: int, own: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` sections of ``size``^2 cut from one random image smoothed by ``smooth`` px (std 1) at random
    shifts of up to ``reach`` px (``reach`` <= ``pad``), each plus ``own()``, its own detail; and the shifts."""
    shared = ndimage.gaussian_filter(rng.standard_normal((size + 2 * pad, size + 2 * pad)), smooth)
    shared /= shared.std()
    shifts = rng.integers(-reach, reach + 1, size=(count, 2))
    sections = [100 + 20 * (shared[pad + y : pad + y + size, pad + x : pad + x + size] + own()) for y, x in shifts]
    return np.stack(sections).astype(np.float32), shifts


def fine_detail(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """``size``^2 texture of ~2 px with std ``strength``: detail of one section that does not carry to the next."""
    detail = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2)
    return strength * detail / detail.std()


def pair_errors(pairs: list, shifts: np.ndarray) -> np.ndarray:
    """Each translation-only pair's error, px: ``raw_j(p) ~ raw_z(p + s_j - s_z)``."""
    return np.array([np.abs(matrix[:, 2] - (shifts[j] - shifts[z])).max() for z, j, matrix, _ in pairs])


def test_pairs_matched_near_the_noise_floor_get_a_second_opinion_at_coarser_scale():
    # Shared coarse structure, shifted per section, under strong independent fine noise (as between
    # sections far apart in z): at the matching scale some pairs lock onto noise; 2x coarser they do not.
    rng = np.random.default_rng(0)
    stack, shifts = shifted_copies(rng, 128, 3, 32, 12, 8, lambda: 8 * rng.standard_normal((128, 128)))
    single = rigid.pairwise_rigid(stack, (1,), downsample=1, max_rotation_deg=0)
    checked = rigid.pairwise_rigid(stack, (1,), downsample=1, max_rotation_deg=0, second_opinion=1.25)
    assert pair_errors(single, shifts).max() > 5
    assert pair_errors(checked, shifts).max() < 3
    assert [score for *_, score in checked] == [score for *_, score in single]  # the finer match's score is kept


def test_second_opinions_go_on_to_coarser_scales_while_the_sections_stay_wide_enough():
    # Shared structure of ~12 px under independent texture of ~2 px, 4x stronger (fine detail that does not
    # carry from section to section): at the matching scale and 2x coarser the pairs lock onto the texture;
    # 4x and 8x coarser, where it has averaged out, they do not.
    rng = np.random.default_rng(0)
    stack, shifts = shifted_copies(rng, 512, 12, 128, 60, 6, lambda: fine_detail(rng, 512, 4))

    def worst(coarsest_side: int) -> float:
        pairs = rigid.pairwise_rigid(
            stack, (1,), downsample=1, max_rotation_deg=0, second_opinion=2.0, coarsest_side=coarsest_side
        )
        return pair_errors(pairs, shifts).max()

    assert worst(256) > 50  # 2x coarser only
    assert worst(64) < 20  # 2x, 4x and 8x: the scale whose peak stands highest above its floor


def test_margins_tell_pairs_that_match_only_at_a_coarser_scale_from_unrelated_sections():
    # Shared structure of ~12 px under independent texture of ~2 px, 2x stronger: every pair's fine peak sits
    # near the floor; coarser, related sections stand clear of it and unrelated ones (each its own image) do not.
    rng = np.random.default_rng(0)

    def texture() -> np.ndarray:
        return fine_detail(rng, 512, 2)

    def margins(stack: np.ndarray, second_opinion: float | None = 2.0) -> list[float]:
        found: dict[tuple[int, int], float] = {}
        rigid.pairwise_rigid(
            stack,
            (1, 2),
            downsample=1,
            max_rotation_deg=0,
            second_opinion=second_opinion,
            coarsest_side=64,
            margins=found,
        )
        return list(found.values())

    related, _ = shifted_copies(rng, 512, 12, 128, 60, 6, texture)
    unrelated = np.stack([shifted_copies(rng, 512, 12, 128, 60, 1, texture)[0][0] for _ in range(6)])
    assert min(margins(related)) > rigid.SECOND_OPINION_MARGIN > max(margins(unrelated))
    assert margins(related, second_opinion=None) == []  # measured only where second opinions are asked


def synthetic_pairs(
    transforms: np.ndarray, offsets: tuple[int, ...], noise: float, rng: np.random.Generator, shape: tuple[int, int]
) -> list[tuple[int, int, np.ndarray, float]]:
    """Pairs ``P = T_z T_j^-1`` measured with independent noise (``noise`` px; angle noise alike at the rim)."""
    pairs = []
    for z in range(len(transforms)):
        for k in offsets:
            if z >= k:
                error = rigid.rigid_matrix(rng.normal(0, np.rad2deg(noise / 100)), rng.normal(0, noise, 2), shape)
                pairs.append((z, z - k, compose(compose(transforms[z], inverse(transforms[z - k])), error), 0.8))
    return pairs


def random_transforms(n: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return np.stack([rigid.rigid_matrix(rng.normal(0, 1), rng.normal(0, 15, 2), shape) for _ in range(n)])


def test_solve_rigid_beats_chain_on_long_stack():
    shape, rng = (256, 256), np.random.default_rng(9)
    truth = random_transforms(60, shape, rng)  # aligned_z = raw_z o T_z
    motions = np.stack([inverse(t) for t in truth])
    pairs = synthetic_pairs(truth, (1, 2, 3), noise=0.5, rng=rng, shape=shape)
    chain = np.zeros_like(truth)
    chain[0] = np.eye(2, 3)
    for z, j, matrix, _ in pairs:
        if z - j == 1:
            chain[z] = compose(matrix, chain[z - 1])
    solved = rigid.solve_rigid(60, pairs, shape)
    chain_error, solve_error = residual_spread(chain, motions, shape), residual_spread(solved, motions, shape)
    assert solve_error < 0.5 * chain_error
    assert solve_error < 1.0
    # The gauge: no mean rotation or translation over the stack.
    angles, shifts = zip(*(rigid._angle_and_shift(t, shape) for t in solved), strict=True)
    assert abs(np.mean(angles)) < 1e-6 and np.abs(np.mean(shifts, axis=0)).max() < 1e-6


def test_solve_rigid_down_weights_gross_outliers():
    shape, rng = (256, 256), np.random.default_rng(10)
    truth = random_transforms(30, shape, rng)
    motions = np.stack([inverse(t) for t in truth])
    pairs = synthetic_pairs(truth, (1, 2, 3), noise=0.2, rng=rng, shape=shape)
    for i in rng.choice(len(pairs), 8, replace=False):  # failed matches: wild, with middling scores
        z, j, _, _ = pairs[i]
        pairs[i] = (z, j, rigid.rigid_matrix(rng.uniform(-10, 10), rng.uniform(-100, 100, 2), shape), 0.4)
    assert residual_spread(rigid.solve_rigid(30, pairs, shape), motions, shape) < 0.5


def test_solve_rigid_leaves_an_aligned_stack_alone():
    pairs = [(z, z - k, np.eye(2, 3), 0.7) for z in range(12) for k in (1, 2, 3) if z >= k]
    np.testing.assert_allclose(rigid.solve_rigid(12, pairs, (100, 120)), np.tile(np.eye(2, 3), (12, 1, 1)), atol=1e-9)


def test_solve_translations_gives_solve_rigids_translations_for_many_problems_at_once():
    rng = np.random.default_rng(11)
    depth, problems = 40, 6
    truth = rng.normal(0, 3, (depth, problems, 2))
    moving, fixed = np.array([(z, z - k) for z in range(depth) for k in (1, 2, 3) if z >= k]).T
    shifts = truth[moving] - truth[fixed] + rng.normal(0, 0.3, (len(moving), problems, 2))
    scores = rng.uniform(0.6, 0.9, (len(moving), problems))
    wild = rng.random((len(moving), problems)) < 0.05  # failed matches: far off, with low peaks
    shifts[wild] += rng.normal(0, 30, (wild.sum(), 2))
    scores[wild] = 0.3
    scores[rng.random(scores.shape) < 0.05] = np.nan  # no measurement
    solved = rigid.solve_translations(depth, moving, fixed, shifts, scores)
    for n in range(problems):
        pairs = [
            (z, j, np.array([[1.0, 0.0, shifts[p, n, 0]], [0.0, 1.0, shifts[p, n, 1]]]), scores[p, n])
            for p, (z, j) in enumerate(zip(moving, fixed, strict=True))
            if np.isfinite(scores[p, n])
        ]
        np.testing.assert_allclose(solved[:, n], rigid.solve_rigid(depth, pairs, (96, 96))[:, :, 2], atol=1e-9)
    assert np.abs(solved - (truth - truth.mean(axis=0))).max() < 1.0


def test_solve_rigid_down_weights_an_offset_whose_matches_are_all_poor():
    # At wide z-spacing pairs three sections apart match at the noise floor: every one of them is off.
    shape, rng = (256, 256), np.random.default_rng(12)
    truth = random_transforms(40, shape, rng)
    motions = np.stack([inverse(t) for t in truth])
    pairs = synthetic_pairs(truth, (1, 2), noise=0.3, rng=rng, shape=shape)
    pairs += [
        (z, j, compose(m, rigid.rigid_matrix(0.0, rng.normal(0, 4, 2), shape)), s)
        for z, j, m, s in synthetic_pairs(truth, (3,), noise=0.3, rng=rng, shape=shape)
    ]
    assert residual_spread(rigid.solve_rigid(40, pairs, shape), motions, shape) < 0.8  # 2.9 px if trusted


def test_unrelated_peak_is_the_peak_against_the_section_turned_half_round():
    a, b = (np.asarray(s, np.float32) for s in em_texture((2, 128, 128), seed=0))
    turned = rigid._Section(np.ascontiguousarray(b[::-1, ::-1]), rigid.LOWPASS)
    fixed, moving = rigid._Section(a, rigid.LOWPASS), rigid._Section(b, rigid.LOWPASS)
    expected = rigid.correlation_peaks(fixed.spectrum, turned.spectrum, a.shape, 1)[1][0]
    assert rigid._unrelated_peak(fixed, moving) == pytest.approx(expected, abs=1e-6)  # float32 spectra
    assert (
        rigid._unrelated_peak(fixed, moving)
        < 0.3
        < rigid.correlation_peaks(fixed.spectrum, moving.spectrum, a.shape, 1)[1][0]
    )


def test_detrend_rigid_keeps_a_slow_angle_wander_under_a_soft_angle_trend():
    rng = np.random.default_rng(0)
    shape, depth = (100, 100), 60
    wander = 1.5 * np.sin(np.arange(depth) / 6.0)  # degrees, a period of ~38 sections: not a straight line
    jitter = rng.normal(0, 1.0, depth)
    matrices = np.stack([rigid.rigid_matrix(w + j, (0.0, 0.0), shape) for w, j in zip(wander, jitter, strict=True)])

    def corrected_angles(**stiffness: float) -> np.ndarray:
        detrended = rigid.detrend_rigid(matrices, shape, **stiffness)
        return np.array([rigid._angle_and_shift(m, shape)[0] for m in detrended])

    soft = corrected_angles(stiffness=1e4, angle_stiffness=100.0)
    stiff = corrected_angles(stiffness=1e4)
    assert np.sqrt(np.mean((soft - jitter) ** 2)) < 0.45  # the wander stays as content, the jitter is corrected
    assert np.sqrt(np.mean((stiff - jitter) ** 2)) > 0.7  # one stiffness for all: the wander is "corrected" too


def test_misaligned_slope_takes_the_slope_that_a_short_stack_jitter_explains():
    rng = np.random.default_rng(3)
    depth = 12
    jitter = rng.normal(0, 50.0, (depth, 2))  # large offsets over few sections: their fitted slope is several px
    trend = np.repeat(jitter.mean(0, keepdims=True), depth, 0)
    slope = rigid.misaligned_slope(jitter, trend)
    z = np.arange(depth) - (depth - 1) / 2
    fitted = np.array([np.polyfit(z, jitter[:, k], 1)[0] for k in range(2)])
    np.testing.assert_allclose(slope, z[:, None] * fitted[None], atol=1e-9)


def test_misaligned_slope_leaves_an_oblique_trend_far_steeper_than_the_jitter():
    rng = np.random.default_rng(4)
    depth = 32
    z = np.arange(depth, dtype=float)
    values = 3.0 * z[:, None] + rng.normal(0, 0.5, (depth, 2))  # content running 3 px per section, 0.5 px noise
    trend = 3.0 * z[:, None] + (values - 3.0 * z[:, None]).mean(0)
    taken = rigid.misaligned_slope(values, trend)
    limit = rigid.SLOPE_TOLERANCE * 0.6 / np.sqrt(np.sum((z - z.mean()) ** 2))
    assert np.all(np.abs(np.diff(taken, axis=0)) < limit)  # at most what the noise could explain
    assert np.all(np.abs(np.diff(taken, axis=0)) < 0.01)


def test_misaligned_slope_takes_what_a_drift_has_beyond_max_slope():
    rng = np.random.default_rng(4)
    depth = 32
    z = np.arange(depth, dtype=float)
    values = 3.0 * z[:, None] + rng.normal(0, 0.5, (depth, 2))
    trend = 3.0 * z[:, None] + (values - 3.0 * z[:, None]).mean(0)
    taken = rigid.misaligned_slope(values, trend, max_slope=1.0)
    np.testing.assert_allclose(np.diff(taken, axis=0), 2.0, atol=0.05)  # 3 px per section, 1 of it kept


def test_detrend_rigid_corrects_four_large_offsets_that_lie_near_a_line_steeper_than_max_drift():
    # the centre offsets of four 4096^2 sections misaligned by 400 px (seed 1 of the strained mosaic case): their
    # scatter about their own line explains only a fifth of its slope of 228 px per section
    shape = (4096, 4096)
    offsets = np.array([[139.0, 328.0], [212.0, 216.0], [367.0, 727.0], [846.0, -294.0]])
    matrices = np.stack([rigid.rigid_matrix(0.0, o, shape) for o in offsets])

    def kept_slope(max_drift: float) -> float:
        detrended = rigid.detrend_rigid(matrices, shape, 1e4, max_drift=max_drift)
        kept = offsets - rigid.centre_shifts(detrended, shape)  # what the prealignment leaves in place
        return float(np.abs(np.polyfit(np.arange(4.0), kept, 1)[0]).max())

    assert kept_slope(np.inf) > 100
    assert kept_slope(4.0) <= 4.0 + 1e-6


def test_jitter_and_wander_separate_independent_jitter_from_a_random_walk():
    rng = np.random.default_rng(6)
    depth, columns = 4000, 2
    walk = np.cumsum(rng.normal(0, 0.5, (depth, columns)), axis=0)
    values = walk + rng.normal(0, 1.0, (depth, columns))
    jitter, step = rigid.jitter_and_wander(values)
    np.testing.assert_allclose(np.sqrt(jitter), 1.0, rtol=0.1)
    np.testing.assert_allclose(np.sqrt(step), 0.5, rtol=0.2)


def _wander_slopes(jitter_sd: float, step_sd: float, draws: int = 400, depth: int = 12) -> tuple[float, float]:
    """Mean |taken slope - jitter's own slope| with and without the slope correction (``wander``), px per section."""
    rng = np.random.default_rng(7)
    z = np.arange(depth) - (depth - 1) / 2
    errors = np.zeros((draws, 2))
    for draw in range(draws):
        jitter = rng.normal(0, jitter_sd, (depth, 1))
        values = jitter + np.cumsum(rng.normal(0, step_sd, (depth, 1)), axis=0)
        taken = rigid.misaligned_slope(values, values, wander=True)
        own = np.polyfit(z, jitter[:, 0], 1)[0]
        errors[draw] = abs(np.polyfit(z, taken[:, 0], 1)[0] - own), abs(own)
    return tuple(errors.mean(0))


def test_misaligned_slope_with_wander_takes_the_jitters_slope_when_jitter_dominates():
    corrected, left = _wander_slopes(jitter_sd=3.0, step_sd=0.2)
    assert corrected < 0.7 * left  # twelve sections estimate the jitter and the wander only roughly


def test_misaligned_slope_with_wander_leaves_the_slope_of_a_wander_alone():
    rng = np.random.default_rng(8)
    walks = np.cumsum(rng.normal(0, 0.3, (400, 12)), axis=1)
    taken = [rigid.misaligned_slope(walk[:, None], walk[:, None], wander=True) for walk in walks]
    fitted = [abs(np.polyfit(np.arange(12), walk, 1)[0]) for walk in walks]
    slopes = [abs(t[1, 0] - t[0, 0]) for t in taken]
    assert np.mean(slopes) < 0.35 * np.mean(fitted)  # an aligned stack's angles are not rotated by their wander


def test_detrend_rigid_corrects_the_slope_of_large_offsets_in_a_short_stack():
    rng = np.random.default_rng(5)
    shape, depth = (200, 200), 12
    offsets = rng.normal(0, 50.0, (depth, 2))
    matrices = np.stack([rigid.rigid_matrix(0.0, o, shape) for o in offsets])
    shifts = np.array([rigid._angle_and_shift(m, shape)[1] for m in rigid.detrend_rigid(matrices, shape, 1e4)])
    z = np.arange(depth) - (depth - 1) / 2
    line = np.stack([np.polyval(np.polyfit(z, offsets[:, k], 1), z) for k in range(2)], 1)
    kept = offsets - shifts  # what the prealignment leaves in place
    assert np.sqrt(np.mean((kept - kept.mean(0)) ** 2)) < 0.1 * np.sqrt(np.mean((line - line.mean(0)) ** 2))


def test_angle_residuals_are_each_pairs_misfit_against_the_solved_angles():
    shape = (100, 100)
    solved = np.stack([rigid.rigid_matrix(a, (0.0, 0.0), shape) for a in (0.0, 1.0, 3.0)])
    pairs = [
        (1, 0, rigid.rigid_matrix(1.0, (2.0, 0.0), shape), 0.5),
        (2, 0, rigid.rigid_matrix(2.5, (0.0, 0.0), shape), 0.5),
    ]
    np.testing.assert_allclose(rigid.angle_residuals(solved, pairs), [0.0, -0.5], atol=1e-9)
    np.testing.assert_allclose(rigid.angles(solved), [0.0, 1.0, 3.0], atol=1e-9)


def test_pair_sections_lists_each_pairs_moving_and_fixed_section_even_for_no_pairs():
    pairs = [(3, 1, np.eye(2, 3), 0.5), (4, 2, np.eye(2, 3), 0.9)]
    moving, fixed = rigid.pair_sections(pairs)
    assert moving.tolist() == [3, 4] and fixed.tolist() == [1, 2]
    empty_moving, empty_fixed = rigid.pair_sections([])
    assert empty_moving.shape == empty_fixed.shape == (0,) and empty_moving.dtype.kind == "i"
