"""Invalid pixels, pieces and piecewise fields (emalign/masks.py)."""

import numpy as np

from emalign import masks
from emalign.synth import em_texture


def section() -> np.ndarray:
    return em_texture((1, 128, 128), seed=4)[0]


def test_no_data_saturated_areas_featureless_blocks_and_the_user_mask_are_invalid():
    image = section()
    image[:10] = 0
    image[60:64] = 255
    image[96:, 96:] = 128
    user = np.zeros_like(image)
    user[20:30, 20:30] = 1
    invalid = masks.invalid_pixels(image, user)
    assert invalid[:10].all() and invalid[60:64].all() and invalid[20:30, 20:30].all()
    assert invalid[96:, 96:].all()
    assert invalid[32:56, 32:96].mean() < 0.05


def test_isolated_saturated_pixels_stay_valid():
    image = section()
    image[::17, ::13] = 255
    assert not masks.invalid_pixels(image)[::17, ::13].any()


def test_pieces_are_the_large_connected_parts_largest_first():
    valid = np.ones((100, 100), bool)
    valid[40:42] = False  # a crack
    valid[3, :4] = valid[:4, 3] = False  # a 3 x 3 fragment cut off in the corner
    labels, count = masks.pieces(valid)
    assert count == 2
    assert (labels[42:] == 1).all() and (labels[4:40] == 2).all() and (labels[40:42] == 0).all()
    assert (labels[:3, :3] == 0).all()


def test_piecewise_field_keeps_each_piece_value_and_jumps_within_the_crack():
    labels = np.ones((64, 64), int)
    labels[30:34] = 0
    labels[34:] = 2
    fields = [np.full((2, 64, 64), 1.0, np.float32), np.full((2, 64, 64), -3.0, np.float32)]
    grid = masks.piecewise_field(fields, labels, stride=4, sigma=8.0)
    assert grid.shape == (2, 16, 16)
    np.testing.assert_allclose(grid[:, :8], 1.0, atol=1e-5)
    np.testing.assert_allclose(grid[:, 9:], -3.0, atol=1e-5)
    assert set(np.unique(grid[:, 8]).round(5)) <= {1.0, -3.0}


def test_smooth_within_does_not_mix_values_across_the_weight_boundary():
    field = np.zeros((2, 20, 20), np.float32)
    field[:, :, 10:] = 5.0
    weight = np.zeros((20, 20))
    weight[:, :10] = 1
    smoothed = masks.smooth_within(field, weight, sigma=3.0)
    np.testing.assert_allclose(smoothed[:, :, :10], 0.0, atol=1e-6)


def test_the_typical_contrast_of_a_section_read_in_parts_is_the_whole_sections():
    texture = em_texture((1, 200, 170), seed=3)[0]
    texture = (texture - texture.min()) / np.ptp(texture)
    image = (texture * 20 + 100).astype(np.uint8)
    part = (slice(32, 96), slice(64, 160))  # whole 32 px blocks, away from the saturated run
    image[part] = texture[part] * 200 + 20  # a part of more contrast than the section, but for one block
    image[64:96, 96:128] = texture[64:96, 96:128] * 15 + 100  # featureless within the part, not within the section
    image[:40, :90] = 0
    image[120:150, 30:160] = 255
    whole = masks.invalid_pixels(image)
    contrast, count = [], []
    for y0 in range(0, 200, 64):  # parts cut at multiples of the block, each judged with its surroundings
        for x0 in range(0, 170, 96):
            c, n = masks.block_contrast(image, (slice(y0, min(y0 + 64, 200)), slice(x0, min(x0 + 96, 170))))
            contrast.append(c.ravel())
            count.append(n.ravel())
    typical = masks.typical_contrast(np.concatenate(contrast), np.concatenate(count))
    np.testing.assert_array_equal(masks.invalid_pixels(image[part], typical=typical), whole[part])
    block = (slice(32, 64), slice(32, 64))  # that block, within the part
    assert masks.invalid_pixels(image[part])[block].all() and not whole[part][block].any()
