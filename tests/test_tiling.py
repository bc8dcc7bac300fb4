import numpy as np
import pytest

from emalign.tiling import taper, tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(100, 32, 8), (97, 32, 31), (64, 32, 0), (20, 32, 8), (33, 32, 8)]
)
def test_tiles_cover_the_axis_and_neighbours_share_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert 0 < b - a <= tile - overlap


@pytest.mark.parametrize(("length", "tile", "ramp"), [(100, 32, 8), (97, 32, 16), (300, 64, 20), (20, 32, 8)])
def test_tapers_of_tiles_overlapping_by_twice_the_ramp_sum_to_one_or_more_and_fall_at_inner_faces(length, tile, ramp):
    total = np.zeros(length, np.float32)
    for start in tile_starts(length, tile, 2 * ramp):
        stop = min(start + tile, length)
        weights = taper(start, stop, length, ramp)
        assert weights.dtype == np.float32 and np.all(weights > 0)
        if start > 0:
            assert weights[0] == 0.5 / ramp
        if stop < length:
            assert weights[-1] == 0.5 / ramp
        total[start:stop] += weights
    assert np.all(total >= 1.0)


def test_a_taper_shorter_than_both_ramps_keeps_the_smaller_weight():
    np.testing.assert_array_equal(
        taper(4, 8, 20, 4), np.minimum([0.125, 0.375, 0.625, 0.875], [0.875, 0.625, 0.375, 0.125])
    )
    np.testing.assert_array_equal(taper(0, 20, 20, 4), np.ones(20, np.float32))
