import numpy as np
import pytest

from emalign.downsample import block_mean


def test_cropping_drops_the_last_partial_block_and_padding_repeats_the_edge():
    image = np.arange(15, dtype=np.uint8).reshape(3, 5)
    np.testing.assert_array_equal(block_mean(image, 2), [[3.0, 5.0]])
    np.testing.assert_array_equal(block_mean(image, 2, edges="pad"), [[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]])


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_the_mean_of_16_bit_blocks_is_exact_in_float64(factor):
    image = np.random.default_rng(0).integers(0, 2**16, (2, 12, 12), dtype=np.uint16)
    means = block_mean(image, factor)
    sums = image.reshape(2, 12 // factor, factor, 12 // factor, factor).astype(np.int64).sum((2, 4))
    assert means.dtype == np.float64
    np.testing.assert_array_equal(means, sums / factor**2)


def test_with_nodata_a_block_averages_its_data_and_is_zero_when_at_most_half_has_data():
    image = np.array([[4, 0, 0, 0], [8, 6, 0, 9]], np.uint8)
    np.testing.assert_array_equal(block_mean(image, 2, nodata=True), np.array([[6.0, 0.0]], np.float32))
    assert block_mean(image, 2, nodata=True).dtype == np.float32
    np.testing.assert_array_equal(block_mean(image, 1, nodata=True), image.astype(np.float32))
