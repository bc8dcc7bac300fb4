"""Reconciling relative section estimates into one correction per section (emalign/consensus.py)."""

import numpy as np
import pytest
import torch

from emalign import consensus
from emalign.consensus import reference_weights

torch.set_num_threads(1)


def _apply(matrix: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``A c`` for corrections ``c (Z, ...)`` with any trailing shape."""
    return np.tensordot(matrix, values, axes=(1, 0))


def _without_line(values: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """``values (Z, ...)`` minus its least-squares line ``a + b z`` (the consensus' null space), per column."""
    z = np.arange(len(values), dtype=float) if z is None else np.asarray(z, float)
    basis = np.stack([np.ones_like(z), z], 1)
    flat = values.reshape(len(values), -1)
    coef, *_ = np.linalg.lstsq(basis, flat, rcond=None)
    return (flat - basis @ coef).reshape(values.shape)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


# --- indices and weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "length", "expected"),
    [(-1, 5, 1), (5, 5, 3), (-6, 5, 2), (9, 5, 1), (0, 5, 0), (4, 5, 4), (3, 1, 0), (-2, 2, 0), (2, 2, 0)],
)
def test_reflect_mirrors_indices_into_the_stack(index, length, expected):
    assert consensus.reflect(index, length) == expected


def test_neighbour_indices_are_a_symmetric_window_reflected_at_the_ends():
    assert consensus.neighbour_indices(5, 10, 3) == [2, 3, 4, 5, 6, 7, 8]
    assert consensus.neighbour_indices(0, 10, 3) == [3, 2, 1, 0, 1, 2, 3]
    assert consensus.neighbour_indices(9, 10, 3) == [6, 7, 8, 9, 8, 7, 6]
    assert consensus.neighbour_indices(1, 10, 2) == [1, 0, 1, 2, 3]


def test_windows_reflect_at_a_break_as_at_the_ends_of_the_stack():
    assert consensus.segment(6, 12, (5,)) == (5, 12)
    assert consensus.neighbour_indices(5, 12, 3, (5,)) == [8, 7, 6, 5, 6, 7, 8]
    assert consensus.neighbour_indices(4, 12, 2, (5,)) == [2, 3, 4, 3, 2]


def test_no_consensus_equation_links_sections_across_a_break():
    matrix = consensus.consensus_matrix(0, 12, 3, np.zeros(12, bool), breaks=(5,))
    assert not matrix[:5, 5:].any() and not matrix[5:, :5].any()
    np.testing.assert_allclose(matrix.sum(1), 0.0, atol=1e-12)


@pytest.mark.parametrize("z", [0, 1, 5, 9])
def test_window_weights_sum_to_one_and_favour_the_nearest(z):
    weights = consensus.window_weights(z, 10, 3, np.zeros(10, bool))
    assert z not in weights
    assert abs(sum(weights.values()) - 1.0) < 1e-12
    by_distance = {}
    for index, w in weights.items():
        by_distance[abs(index - z)] = by_distance.get(abs(index - z), 0.0) + w
    assert by_distance[1] > by_distance[2] > by_distance[3]


def test_window_weights_of_an_interior_section_are_the_trained_slot_weights():
    slots = reference_weights(3, symmetric=True)
    weights = consensus.window_weights(5, 12, 3, np.zeros(12, bool))
    assert weights == pytest.approx({5 + d: slots[3 + d] for d in (-3, -2, -1, 1, 2, 3)})


def test_window_weights_exclude_excluded_sections_and_renormalise():
    excluded = np.zeros(12, bool)
    excluded[[4, 7]] = True
    weights = consensus.window_weights(5, 12, 3, excluded)
    assert set(weights) == {2, 3, 6, 8}
    assert abs(sum(weights.values()) - 1.0) < 1e-12
    full = consensus.window_weights(5, 12, 3, np.zeros(12, bool))
    assert weights[6] / weights[3] == pytest.approx(full[6] / full[3])


def test_window_weights_are_empty_without_usable_references():
    excluded = np.ones(6, bool)
    excluded[2] = False
    assert consensus.window_weights(2, 6, 2, excluded) == {}


def test_window_weights_never_reference_the_section_itself_in_short_stacks():
    assert consensus.window_weights(0, 2, 3, np.zeros(2, bool)) == {1: pytest.approx(1.0)}


# --- the consensus system ----------------------------------------------------------------------------------


def test_consensus_matrix_rows_annihilate_constants_and_interior_rows_linear_ramps():
    matrix = consensus.consensus_matrix(0, 30, 3, np.zeros(30, bool))
    z = np.arange(30.0)
    np.testing.assert_allclose(matrix @ np.ones(30), 0.0, atol=1e-12)
    np.testing.assert_allclose((matrix @ z)[3:-3], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(matrix), 1.0)


def test_consensus_matrix_zeroes_rows_of_excluded_sections_and_of_windows_leaving_the_block():
    excluded = np.zeros(40, bool)
    excluded[20] = True
    matrix = consensus.consensus_matrix(10, 30, 3, excluded)
    zero_rows = np.flatnonzero(~matrix.any(1)) + 10
    assert list(zero_rows) == [10, 11, 12, 20, 27, 28, 29]
    assert not matrix[:, 20 - 10].any()  # nobody references the excluded section


def test_solve_block_recovers_corrections_up_to_a_line_in_z():
    rng = np.random.default_rng(0)
    length, k = 40, 3
    excluded = np.zeros(length, bool)
    truth = rng.normal(0, 2.0, (length, 2, 3, 4))
    relative = _apply(consensus.consensus_matrix(0, length, k, excluded), truth)
    solved = consensus.solve_block(relative.astype(np.float32), k, excluded, spring=1e-6)
    assert solved.shape == truth.shape and solved.dtype == np.float32
    assert _rms(_without_line(solved - truth)) < 1e-3 * _rms(truth)


def test_solve_block_ignores_the_estimates_of_excluded_sections():
    rng = np.random.default_rng(1)
    length, k = 40, 3
    excluded = np.zeros(length, bool)
    excluded[[10, 25]] = True
    truth = rng.normal(0, 2.0, (length, 2))
    relative = _apply(consensus.consensus_matrix(0, length, k, excluded), truth)
    relative[[10, 25]] = 1000.0  # garbage from blank sections
    solved = consensus.solve_block(relative, k, excluded, spring=1e-6)
    kept = np.flatnonzero(~excluded)
    assert _rms(_without_line(solved[kept] - truth[kept], kept)) < 1e-3 * _rms(truth)
    assert np.all(np.isfinite(solved)) and np.abs(solved[[10, 25]]).max() < 1e-3


def test_solve_block_of_an_inner_block_satisfies_its_equations():
    rng = np.random.default_rng(2)
    length, k, start, stop = 60, 3, 20, 45
    excluded = np.zeros(length, bool)
    truth = rng.normal(0, 2.0, (stop - start, 2))
    matrix = consensus.consensus_matrix(start, stop, k, excluded)
    solved = consensus.solve_block(_apply(matrix, truth), k, excluded, spring=1e-6, start=start)
    np.testing.assert_allclose(_apply(matrix, solved), _apply(matrix, truth), atol=1e-3)


def test_a_strong_spring_keeps_corrections_near_zero():
    relative = np.random.default_rng(3).normal(0, 1.0, (30, 2))
    excluded = np.zeros(30, bool)
    weak = consensus.solve_block(relative, 3, excluded, spring=0.01)
    strong = consensus.solve_block(relative, 3, excluded, spring=100.0)
    assert _rms(strong) < 0.05 * _rms(weak)


def test_stitched_residual_does_not_grow_with_z_while_chaining_random_walks():
    """300 sections with independent offsets; noisy relative estimates; stitching vs cumsum of pair differences."""
    rng = np.random.default_rng(4)
    length, k, noise, spring = 300, 3, 0.3, 0.05
    excluded = np.zeros(length, bool)
    offsets = rng.normal(0, 2.0, (length, 2, 8))  # 16 independent grid points per section
    matrix = consensus.consensus_matrix(0, length, k, excluded)
    relative = _apply(matrix, offsets) + rng.normal(0, noise, offsets.shape)
    stitched = consensus.solve_block(relative, k, excluded, spring)

    # the same solved in overlapping blocks, blended (normalised by the summed blend weights)
    total, norm = np.zeros_like(offsets), np.zeros(length)
    for start, stop in consensus.block_plan(length, 64, 16):
        weights = consensus.blend_weights(start, stop, length, 16)
        total[start:stop] += (
            consensus.solve_block(relative[start:stop], k, excluded, spring, start) * weights[:, None, None]
        )
        norm[start:stop] += weights
    blocked = total / norm[:, None, None]

    pairs = np.diff(offsets, axis=0) + rng.normal(0, noise, (length - 1, *offsets.shape[1:]))
    chained = np.concatenate([offsets[:1], offsets[:1] + np.cumsum(pairs, axis=0)])

    third = length // 3
    for estimate in (stitched, blocked):
        residual = estimate - offsets
        assert _rms(residual[-third:]) < 1.3 * _rms(residual[:third])  # does not grow with z
        assert _rms(residual) < 0.5 * _rms(offsets)  # and is well below no correction
    chain_residual = chained - offsets
    assert _rms(chain_residual[-third:]) > 1.6 * _rms(chain_residual[:third])  # random walk
    assert _rms(stitched - offsets) < 0.5 * _rms(chain_residual)
    assert _rms(blocked - stitched) < 0.2 * _rms(stitched - offsets)


# --- blocks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "block", "overlap"), [(90, 30, 10), (70, 30, 10), (100, 30, 10), (300, 64, 16)])
def test_block_plan_covers_the_stack_with_overlapping_blocks(length, block, overlap):
    plan = consensus.block_plan(length, block, overlap)
    assert plan[0][0] == 0 and plan[-1][1] == length
    assert all(0 < stop - start <= block for start, stop in plan)
    for (_, stop), (start, _) in zip(plan[:-1], plan[1:], strict=True):
        assert stop - start >= overlap


def test_block_plan_of_a_short_stack_is_one_block():
    assert consensus.block_plan(20, 30, 10) == [(0, 20)]
    assert consensus.block_plan(30, 30, 10) == [(0, 30)]


def _summed_blend(length: int, block: int, overlap: int) -> np.ndarray:
    total = np.zeros(length)
    for start, stop in consensus.block_plan(length, block, overlap):
        weights = consensus.blend_weights(start, stop, length, overlap)
        assert weights.shape == (stop - start,) and np.all(weights > 0)
        total[start:stop] += weights
    return total


@pytest.mark.parametrize(("length", "block", "overlap"), [(90, 30, 10), (70, 30, 10), (30, 30, 10), (20, 30, 10)])
def test_blend_weights_of_overlapping_blocks_sum_to_one(length, block, overlap):
    np.testing.assert_allclose(_summed_blend(length, block, overlap), 1.0, atol=1e-12)


@pytest.mark.parametrize(("length", "block", "overlap"), [(100, 30, 10), (300, 64, 16), (45, 30, 10)])
def test_blend_weights_sum_to_one_when_the_last_block_is_shifted_back(length, block, overlap):
    np.testing.assert_allclose(_summed_blend(length, block, overlap), 1.0, atol=1e-12)


BLOCKINGS = [(40, 10, 0), (45, 10, 0), (40, 10, 6), (43, 10, 8), (40, 10, 9), (25, 6, 5), (100, 30, 20), (31, 30, 29)]
"""``(length, block, overlap)``: no overlap, or overlaps of more than half a block (a section in 3+ blocks)."""


@pytest.mark.parametrize(("length", "block", "overlap"), BLOCKINGS)
def test_blend_weights_sum_to_one_across_blocks_for_any_overlap(length, block, overlap):
    np.testing.assert_allclose(_summed_blend(length, block, overlap), 1.0, atol=1e-12)


@pytest.mark.parametrize(("length", "block", "overlap"), BLOCKINGS)
def test_blend_weights_change_by_at_most_one_ramp_step_from_section_to_section(length, block, overlap):
    for start, stop in consensus.block_plan(length, block, overlap):
        weights = consensus.blend_weights(start, stop, length, overlap)
        assert np.abs(np.diff(weights)).max(initial=0.0) <= 1 / (overlap + 1) + 1e-12, (start, stop)


def test_blend_weights_without_overlap_are_one_in_every_block():
    for start, stop in consensus.block_plan(40, 10, 0):
        np.testing.assert_array_equal(consensus.blend_weights(start, stop, 40, 0), np.ones(stop - start))


def test_blend_weights_of_a_block_at_least_twice_the_overlap_are_linear_ramps_on_inner_faces():
    ramp = np.arange(1, 11) / 11
    inner = consensus.blend_weights(20, 50, 100, 10)
    np.testing.assert_allclose(inner, np.concatenate([ramp, np.ones(10), ramp[::-1]]), rtol=1e-15)
    np.testing.assert_array_equal(consensus.blend_weights(0, 30, 100, 10)[:20], 1.0)
    np.testing.assert_array_equal(consensus.blend_weights(80, 100, 100, 10)[10:], 1.0)


# --- smoothing along z -------------------------------------------------------------------------------------


def test_smooth_trend_passes_a_straight_line_unchanged():
    z = np.arange(50.0)
    line = np.stack([2.0 + 0.3 * z, -1.0 - 0.1 * z], 1)
    np.testing.assert_allclose(consensus.smooth_trend(line, stiffness=1e4), line, atol=1e-6)


def test_smooth_trend_removes_white_jitter():
    rng = np.random.default_rng(5)
    z = np.arange(200.0)
    trend = np.stack([0.05 * z, 5 * np.sin(z / 60.0)], 1)
    jitter = rng.normal(0, 1.0, trend.shape)
    smooth = consensus.smooth_trend(trend + jitter, stiffness=1e3)
    assert _rms(smooth - trend) < 0.3 * _rms(jitter)


def test_smooth_trend_ignores_sections_of_zero_weight():
    z = np.arange(30.0)
    line = 1.0 + 0.5 * z
    values = line.copy()
    values[12] = 1000.0
    weights = np.ones(30)
    weights[12] = 0
    np.testing.assert_allclose(consensus.smooth_trend(values, 1e3, weights), line, atol=1e-6)


def test_smooth_trend_of_two_sections_is_their_mean():
    np.testing.assert_allclose(consensus.smooth_trend(np.array([[1.0], [3.0]]), 10.0), [[2.0], [2.0]])


def test_wander_stiffness_stays_at_the_floor_where_the_pairs_are_as_noisy_as_the_misalignment():
    rng = np.random.default_rng(11)
    values, residuals = rng.normal(0, 1.0, (16, 2)), rng.normal(0, 1.0, 45)
    assert consensus.wander_stiffness(values, residuals, floor=100.0) == 100.0


def test_wander_stiffness_grows_with_the_square_of_the_misalignment_over_the_pairs_noise():
    rng = np.random.default_rng(12)
    values, residuals = rng.normal(0, 1.0, (16, 2)), rng.normal(0, 1.0, 45)
    loose = consensus.wander_stiffness(values, 0.1 * residuals, floor=1.0)
    tight = consensus.wander_stiffness(values, 0.01 * residuals, floor=1.0)
    assert loose > 1.0 and tight == pytest.approx(1e4 * loose)
    assert consensus.wander_stiffness(values[:, :1], [], floor=5.0) == 5.0  # no pairs: nothing measured


def test_wander_stiffness_leaves_a_wander_the_pairs_agree_on_to_the_floor():
    rng = np.random.default_rng(13)
    walk = np.cumsum(rng.normal(0, 0.1, (62, 1)), axis=0)  # content turning along z: every pair sees it alike
    misfit = rng.normal(0, 0.1 / np.sqrt(80.0), 180)  # pairs agreeing 80x closer (variance) than the walk steps
    assert consensus.wander_stiffness(walk, misfit, floor=100.0) == 100.0
    assert consensus.wander_stiffness(walk + rng.normal(0, 2.0, (62, 1)), misfit, floor=100.0) > 1e4  # misaligned


def test_flow_stiffness_follows_sections_that_step_no_further_than_their_content_flows():
    rng = np.random.default_rng(14)
    flow = np.cumsum(rng.normal(0, 1.0, (32, 2)), axis=0)  # content moving about 1.4 px per section
    assert consensus.flow_stiffness(flow, content_step=1.5, ceiling=1e4) == consensus.MIN_FLOW_STIFFNESS


def test_flow_stiffness_is_the_ceiling_for_sections_misaligned_far_beyond_the_flow():
    rng = np.random.default_rng(15)
    misaligned = np.cumsum(rng.normal(0, 1.0, (32, 2)), axis=0) + rng.normal(0, 15.0, (32, 2))
    assert consensus.flow_stiffness(misaligned, content_step=1.5, ceiling=1e4) == 1e4
    assert consensus.flow_stiffness(misaligned, content_step=0.0, ceiling=1e4) == 1e4  # no flow expected


def test_flow_stiffness_grows_with_the_square_of_the_misalignment_over_the_flow():
    rng = np.random.default_rng(16)
    jitter = rng.normal(0, 1.0, (64, 2))
    small = consensus.flow_stiffness(4.0 * jitter, content_step=1.0, ceiling=1e9)
    large = consensus.flow_stiffness(8.0 * jitter, content_step=1.0, ceiling=1e9)
    assert small > 10.0 and large == pytest.approx(16.0 * small)
    assert consensus.flow_stiffness(jitter[:2], content_step=1.0, ceiling=7.0) == 7.0  # too few sections to judge
