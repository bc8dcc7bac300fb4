"""Affine coarse alignment: pairwise affines from patch grids, the global solve and the strain's z-trend."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter1d

from emalign import affine, fields, rigid
from emalign.synth import em_texture


def pull(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``image`` pulled by a ``(2, 3)`` affine through emalign.fields (zeros outside)."""
    return fields.warp(image, fields.affine_field(matrix, image.shape))


def about_centre(linear: np.ndarray, shift: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Pull affine ``q - c = linear (p - c) + shift``."""
    return affine.uncentred(np.asarray(linear, float), np.asarray(shift, float), shape)


def compression(amount: float, angle_deg: float) -> np.ndarray:
    """``I + amount d d^T``: content compressed by ``amount`` along direction ``d`` (pull)."""
    d = np.array([np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))])
    return np.eye(2) + amount * np.outer(d, d)


def displacement_error(estimated: np.ndarray, expected: np.ndarray, shape: tuple[int, int]) -> float:
    """Largest difference (px) of two affines over the image."""
    difference = rigid.affine_fields(np.stack([estimated, expected]), shape, stride=8)
    return float(np.abs(difference[0] - difference[1]).max())


def test_pair_affine_recovers_scale_and_compression_from_a_rigid_start():
    shape = (256, 256)
    fixed = em_texture((1, *shape), seed=1)[0].astype(np.float32)
    rotation = rigid.rigid_matrix(2.0, (0, 0), shape)[:, :2]
    truth = about_centre(rotation @ compression(0.03, 30) * 1.01, (4.0, -6.0), shape)
    moving = pull(fixed, np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2])  # moving(truth p) = fixed(p)
    start = rigid.estimate_rigid(fixed, moving).matrix
    assert displacement_error(start, truth, shape) > 3  # what a rigid estimate leaves
    refined = affine.match_affine(fixed, moving, start)
    assert displacement_error(refined, truth, shape) < 0.5


def test_pair_affine_ignores_outlier_patches_and_no_data():
    shape = (256, 256)
    fixed = em_texture((1, *shape), seed=2)[0].astype(np.float32)
    truth = about_centre(np.diag([1.02, 0.99]), (0.0, 0.0), shape)
    moving = pull(fixed, np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2])
    moving[:, :70] = 0  # a strip without data
    rng = np.random.default_rng(0)
    moving[150:214, 150:214] = rng.uniform(1, 255, (64, 64))  # a patch of garbage (a stain, a fold)
    refined = affine.match_affine(fixed, moving, np.eye(2, 3))
    assert displacement_error(refined, truth, shape) < 0.6


def test_fit_affine_drops_gross_outliers_and_patches_without_data():
    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 200, (30, 2))
    truth = about_centre(np.array([[1.01, 0.02], [-0.01, 0.97]]), (2.0, -1.0), (201, 201))
    shifts = centres @ truth[:, :2].T + truth[:, 2] - centres + rng.normal(0, 0.1, (30, 2))
    scores = np.full(30, 0.6)
    shifts[:4] += 25.0  # wrong matches
    shifts[4:8] = 1e3
    scores[4:8] = 0.0  # no data: whatever the shift, it must not count
    fitted = affine.fit_affine(centres, shifts, scores, np.array([100.0, 100.0]))
    assert displacement_error(fitted, truth, (201, 201)) < 0.3
    assert affine.fit_affine(centres[:5], shifts[:5], scores[:5], np.zeros(2)) is None


def random_affines(depth: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Per-section pull affines: shifts 15 px, rotations 1 deg, scale 1 %, compression 2-3 % in a random direction."""
    rng = np.random.default_rng(seed)
    matrices = []
    for _ in range(depth):
        rotation = rigid.rigid_matrix(rng.normal(0, 1), (0, 0), shape)[:, :2]
        linear = rotation @ compression(rng.uniform(0.02, 0.03), rng.uniform(0, 180)) * (1 + rng.normal(0, 0.01))
        matrices.append(about_centre(linear, rng.normal(0, 15, 2), shape))
    return np.stack(matrices)


def pairs_of(matrices: np.ndarray, noise: float, seed: int) -> list[tuple[int, int, np.ndarray, float]]:
    """Pairs ``(z, z - k, P, score)``, ``M_z = P M_j``, linear parts perturbed by ``noise``, shifts by 10x it px."""
    rng = np.random.default_rng(seed)
    square = np.concatenate([matrices, np.tile([[[0, 0, 1.0]]], (len(matrices), 1, 1))], axis=1)
    pairs = []
    for z in range(len(matrices)):
        for k in (1, 2, 3):
            if z - k >= 0:
                pair = (square[z] @ np.linalg.inv(square[z - k]))[:2]
                pair[:, :2] += rng.normal(0, noise, (2, 2))
                pair[:, 2] += rng.normal(0, 10 * noise, 2)
                pairs.append((z, z - k, pair, 0.5))
    return pairs


def strain_error(solved: np.ndarray, truth: np.ndarray) -> float:
    """RMS (over sections) of the largest entry of the strain difference, after removing the mean strain."""
    difference = affine.polar_strain(solved) - affine.polar_strain(truth)
    difference -= difference.mean(axis=0)
    return float(np.sqrt(np.mean(np.abs(difference).max(axis=(1, 2)) ** 2)))


def test_solve_affine_recovers_per_section_scale_and_compression():
    shape, depth = (1024, 1024), 30
    truth = random_affines(depth, shape, seed=4)
    pairs = pairs_of(truth, 1e-4, seed=5)
    pairs[10] = (pairs[10][0], pairs[10][1], about_centre(np.eye(2) * 1.1, (30.0, 0.0), shape), 0.5)  # an outlier
    solved = affine.solve_affine(depth, pairs, shape)
    assert strain_error(solved, truth) < 1e-3  # true strains vary by ~1.5e-2
    # the strain's jitter about its z-trend is the true strain's (the trend of independent strains is ~flat)
    jitter = affine.strain_jitter(solved, stiffness=1e4)
    assert strain_error(jitter, truth) < 2.5e-3


def test_aligned_stack_keeps_its_strain_and_slow_strain_is_kept():
    shape, depth = (512, 512), 40
    pairs = pairs_of(np.tile(np.eye(2, 3), (depth, 1, 1)), 1e-3, seed=6)
    jitter = affine.strain_jitter(affine.solve_affine(depth, pairs, shape), stiffness=100)
    assert np.abs(jitter - np.eye(2)).max() < 2e-3  # pair noise 1e-3 per entry
    slow = np.stack([about_centre(np.eye(2) * (1 + 0.02 * np.sin(z / 8)), (0.0, 0.0), shape) for z in range(depth)])
    jitter = affine.strain_jitter(affine.solve_affine(depth, pairs_of(slow, 0.0, seed=7), shape), stiffness=100)
    np.testing.assert_allclose(jitter, np.tile(np.eye(2), (depth, 1, 1)), atol=3e-3)  # of a 2e-2 wave


def test_apply_strain_acts_before_the_rigid_transform():
    shape = (200, 300)
    rotation = rigid.rigid_matrix(3.0, (5.0, -2.0), shape)
    strain = np.array([[[1.02, 0.01], [0.01, 0.98]]])
    combined = affine.apply_strain(rotation[None], strain, shape)[0]
    linear, _ = affine.centred(combined, shape)
    np.testing.assert_allclose(affine.polar_strain(linear), strain[0], atol=1e-12)
    np.testing.assert_allclose(affine.centred(combined, shape)[1], affine.centred(rotation, shape)[1], atol=1e-12)


def test_strain_is_applied_where_pairs_agree_on_it_and_not_where_they_only_disagree():
    shape, depth = (1024, 1024), 40

    def gain(pairs: list) -> float:
        solved = affine.solve_affine(depth, pairs, shape)
        residuals = affine.strain_residuals(solved, pairs, shape)
        return affine.strain_gain(affine.strain_jitter(solved, 100), residuals, shape)

    assert gain(pairs_of(random_affines(depth, shape, seed=8), 2e-4, seed=9)) > 0.95
    assert gain(pairs_of(np.tile(np.eye(2, 3), (depth, 1, 1)), 2e-3, seed=10)) < 0.3  # noise only


def test_prealignment_applies_the_strain_measured_by_precise_affine_pairs_and_nothing_from_noise():
    from emalign.pipeline.estimate import pair_table, solve_pairs

    shape, depth = (1024, 1024), 24
    bad = np.zeros(depth, bool)
    truth = random_affines(depth, shape, seed=11)
    table = pair_table(pairs_of(truth, 1e-4, seed=12), 0, 0, depth)
    rigid_only = solve_pairs(table, bad, [], shape, 1e4)[0]
    with_strain = solve_pairs(table, bad, [], shape, 1e4, strain_table=table)[0]
    assert strain_error(rigid_only, truth) > 5e-3
    assert strain_error(with_strain, truth) < 1e-3  # pairs 100x more precise than the strains vary: all of it
    np.testing.assert_allclose(affine.centred(with_strain, shape)[1], affine.centred(rigid_only, shape)[1], atol=1e-9)
    noise = pair_table(pairs_of(np.tile(np.eye(2, 3), (depth, 1, 1)), 1e-3, seed=13), 0, 0, depth)
    moved = rigid.affine_fields(solve_pairs(noise, bad, [], shape, 1e4, strain_table=noise)[0], shape, stride=16)
    still = rigid.affine_fields(solve_pairs(noise, bad, [], shape, 1e4)[0], shape, stride=16)
    assert np.sqrt(np.mean(np.sum((moved - still) ** 2, axis=1))) < 0.1  # px


def turned(table: np.ndarray, sigma_deg: float, shape: tuple[int, int], seed: int) -> np.ndarray:
    """A pair table whose pairs are each turned about the centre of ``shape`` by ``N(0, sigma_deg)`` degrees."""
    rng = np.random.default_rng(seed)
    out = table.copy()
    for z, i in zip(*np.nonzero(np.isfinite(table[..., 6])), strict=True):
        turn = rigid.rigid_matrix(rng.normal(0, sigma_deg), (0, 0), shape)
        out[z, i, :6] = rigid._compose(turn, table[z, i, :6].reshape(2, 3)).ravel()
    return out


def test_rigid_solve_takes_the_affine_pairs_angles_where_the_strain_is_measured():
    from emalign.pipeline.estimate import pair_table, solve_pairs

    shape, depth = (1024, 1024), 24
    bad = np.zeros(depth, bool)
    strained = pair_table(pairs_of(random_affines(depth, shape, seed=14), 1e-4, seed=15), 0, 0, depth)
    biased = turned(strained, 0.2, shape, seed=16)  # rigid pairs whose angles the strain has pulled
    unbiased = rigid.angles(solve_pairs(strained, bad, [], shape, 1e4, strain_table=strained)[0])
    strain_aware = solve_pairs(biased, bad, [], shape, 1e4, strain_table=strained)[0]
    assert np.abs(rigid.angles(strain_aware) - unbiased).max() < 0.01
    assert np.abs(rigid.angles(solve_pairs(biased, bad, [], shape, 1e4)[0]) - unbiased).max() > 0.1
    # an aligned stack: its affine pairs only disagree about the strain, and the rigid pairs' angles stand
    noise = pair_table(pairs_of(np.tile(np.eye(2, 3), (depth, 1, 1)), 1e-3, seed=17), 0, 0, depth)
    rigid_pairs = turned(noise, 0.05, shape, seed=18)
    rigid_only = rigid.angles(solve_pairs(rigid_pairs, bad, [], shape, 1e4)[0])
    affine_only = rigid.angles(solve_pairs(noise, bad, [], shape, 1e4, strain_table=noise)[0])
    both = rigid.angles(solve_pairs(rigid_pairs, bad, [], shape, 1e4, strain_table=noise)[0])
    assert np.abs(both - rigid_only).max() < 0.3 * np.abs(affine_only - rigid_only).max()


@pytest.mark.parametrize("depth", [16, 4])
def test_prealignment_corrects_slow_rotation_and_strain_misalignment_where_the_pairs_are_precise(depth):
    from emalign.pipeline.estimate import pair_table, solve_pairs

    shape = (1024, 1024)
    tilt = [rigid.rigid_matrix(0.06 * (z - (depth - 1) / 2), (0.0, 0.0), shape) for z in range(depth)]
    truth = np.stack([rigid._compose(t, m) for t, m in zip(tilt, random_affines(depth, shape, seed=23), strict=True)])
    table = pair_table(pairs_of(truth, 1e-4, seed=20), 0, 0, depth)
    solved = solve_pairs(table, np.zeros(depth, bool), [], shape, 1e4, strain_table=table)[0]
    square = np.concatenate([solved, np.tile([[[0, 0, 1.0]]], (depth, 1, 1))], axis=1)
    left = np.stack([np.linalg.inv(np.vstack([t, [0, 0, 1.0]])) @ s for t, s in zip(truth, square, strict=True)])
    kept_angles = rigid.angles(left[:, :2])
    # independent 1 deg rotations and 1 % scales over a few sections: their slow part and the slope their draws
    # could have are misalignment, not content
    assert np.std(kept_angles) < 0.02  # degrees
    assert strain_error(left[:, :2], np.tile(np.eye(2, 3), (depth, 1, 1))) < 1e-3


def test_prealignment_keeps_the_flow_of_an_aligned_stack_and_corrects_a_misaligned_one():
    from emalign.pipeline.estimate import pair_table, solve_pairs

    shape, depth = (512, 512), 32
    bad = np.zeros(depth, bool)
    rng = np.random.default_rng(24)
    walk = gaussian_filter1d(np.cumsum(rng.normal(0, 1.0, (depth, 2)), axis=0), 2.0, axis=0)
    flow = walk / np.sqrt(np.mean(np.sum(np.diff(walk, axis=0) ** 2, axis=1)))  # content drifting 1 px a section
    jitter = rng.normal(0, 15.0, (depth, 2))
    for shifts, misaligned in ((flow, False), (flow + jitter, True)):
        truth = np.stack([rigid.rigid_matrix(0.0, tuple(s), shape) for s in shifts])
        table = pair_table(pairs_of(truth, 1e-4, seed=25), 0, 0, depth)
        solved, stiffness = solve_pairs(table, bad, [], shape, 1e4, content_step=1.5)
        corrected = rigid.centre_shifts(solved, shape)
        if misaligned:  # the solved sections are the jitter, up to the flow and a straight line along z
            assert stiffness.min() == 1e4
            z = np.arange(depth)
            left = [d - np.polyval(np.polyfit(z, d, 1), z) for d in (corrected - jitter).T]
            assert np.sqrt(np.mean(np.square(left))) < 0.2 * np.std(jitter)
        else:  # the sections are left about where they are; a trend blind to the flow moves them by its wander
            assert stiffness.max() == 1.0
            stiff = rigid.centre_shifts(solve_pairs(table, bad, [], shape, 1e4)[0], shape)
            assert np.sqrt(np.mean(corrected**2)) < 0.25 * np.sqrt(np.mean(stiff**2))
