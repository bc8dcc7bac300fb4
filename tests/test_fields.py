"""Field math: one pull convention for numpy and torch, 2D and 3D (emalign/fields.py)."""

import numpy as np
import pytest
import torch

from emalign import fields

torch.set_num_threads(1)


def _ramp(shape: tuple[int, ...], slopes: tuple[float, ...], offset: float = 10.0) -> np.ndarray:
    """A linear image ``offset + sum_i slopes_i * p_i``: bilinear/trilinear sampling is exact on it."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    return (offset + sum(s * g for s, g in zip(slopes, grids, strict=True))).astype(np.float32)


def _constant(shift: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.asarray(shift, np.float32).reshape(-1, *([1] * len(shape))), (len(shift), *shape)).copy()


def _smooth(shape: tuple[int, int], amplitude: float, seed: int) -> np.ndarray:
    """A smooth fold-free 2D field made of a few long sinusoids."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    out = np.zeros((2, *shape), np.float32)
    for c in range(2):
        for _ in range(3):
            ky, kx = rng.uniform(-1, 1, 2) * 2 * np.pi / 40.0
            out[c] += np.sin(ky * y + kx * x + rng.uniform(0, 2 * np.pi)) * amplitude / 3
    return out


def _smooth_image(shape: tuple[int, int]) -> np.ndarray:
    y, x = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return (100 + 30 * np.sin(y / 9.0) * np.cos(x / 11.0) + 20 * np.cos((x + y) / 13.0)).astype(np.float32)


def _affine(angle_deg: float, scale: float, shift: tuple[float, float], centre: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = np.array([centre, centre])
    return np.hstack([rot, (c - rot @ c + np.asarray(shift))[:, None]])


def _affine_at(matrix: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Pull field ``A p + t - p`` at explicit full-resolution positions ``(2, ...)``."""
    flat = positions.reshape(2, -1)
    return (matrix[:, :2] @ flat + matrix[:, 2:] - flat).reshape(positions.shape).astype(np.float32)


# --- a pure shift moves an image by exactly that many pixels -------------------------------------------------


@pytest.mark.parametrize("shift", [3, -2])
@pytest.mark.parametrize("axis", [0, 1])
def test_integer_shift_moves_2d_image_by_exactly_that_many_pixels(shift, axis):
    image = np.random.default_rng(0).uniform(1, 255, (20, 23)).astype(np.float32)
    vector = [0.0, 0.0]
    vector[axis] = shift
    out = fields.warp(image, _constant(vector, image.shape))
    expected = np.zeros_like(image)
    n = image.shape[axis]
    dst = [slice(None)] * 2
    src = [slice(None)] * 2
    dst[axis] = slice(max(0, -shift), n - max(0, shift))
    src[axis] = slice(max(0, shift), n + min(0, shift))
    expected[tuple(dst)] = image[tuple(src)]  # pull: out(p) = image(p + shift); outside is 0
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-3)


@pytest.mark.parametrize("shift", [(0.3, -1.7), (-2.25, 0.5)])
def test_subpixel_shift_of_a_linear_ramp_is_exact_in_numpy_warp(shift):
    image = _ramp((21, 30), (2.0, -1.5))
    out = fields.warp(image, _constant(shift, image.shape))
    expected = _ramp((21, 30), (2.0, -1.5), offset=10.0 + 2.0 * shift[0] - 1.5 * shift[1])
    inner = (slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)


@pytest.mark.parametrize("shift", [(0.4, -1.25), (-1.5, 2.75)])
def test_subpixel_shift_of_a_linear_ramp_is_exact_in_warp_torch(shift):
    image = torch.from_numpy(_ramp((17, 26), (1.0, 3.0)))[None, None].repeat(2, 1, 1, 1)
    field = torch.from_numpy(_constant(shift, (17, 26)))[None].repeat(2, 1, 1, 1)
    out = fields.warp_torch(image, field)
    expected = _ramp((17, 26), (1.0, 3.0), offset=10.0 + shift[0] + 3.0 * shift[1])
    assert out.shape == (2, 1, 17, 26)
    np.testing.assert_allclose(
        out[:, 0, 3:-3, 3:-3].numpy(), np.broadcast_to(expected[3:-3, 3:-3], (2, 11, 20)), atol=1e-3
    )


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -2, 0), (0, 0, 3), (0.5, -0.25, 1.5)])
def test_shift_moves_3d_volume_by_exactly_that_many_voxels(shift):
    shape = (9, 12, 14)
    slopes = (5.0, -2.0, 1.0)
    volume = _ramp(shape, slopes)
    field = _constant(shift, shape)
    expected = _ramp(shape, slopes, offset=10.0 + float(np.dot(slopes, shift)))
    inner = (slice(2, -2), slice(3, -3), slice(4, -4))
    np.testing.assert_allclose(fields.warp(volume, field)[inner], expected[inner], atol=1e-3)
    out = fields.warp_torch(torch.from_numpy(volume)[None, None], torch.from_numpy(field)[None])
    np.testing.assert_allclose(out[0, 0].numpy()[inner], expected[inner], atol=1e-3)


def test_integer_shift_of_3d_volume_moves_the_content_and_zero_fills():
    volume = np.random.default_rng(1).uniform(1, 9, (6, 8, 10)).astype(np.float32)
    out = fields.warp(volume, _constant((2, -1, 0), volume.shape))
    np.testing.assert_allclose(out[:4, 1:, :], volume[2:, :-1, :], atol=1e-4)
    assert np.abs(out[4:]).max() < 1e-4 and np.abs(out[:, 0]).max() < 1e-4


def test_warp_outside_the_image_gives_cval():
    image = np.full((10, 10), 7.0, np.float32)
    out = fields.warp(image, _constant((0.0, 20.0), image.shape), cval=3.0)
    np.testing.assert_allclose(out, 3.0)


def test_nearest_warp_keeps_label_values():
    labels = np.random.default_rng(2).integers(1, 5, (16, 16)).astype(np.float32)
    out = fields.warp(labels, _smooth((16, 16), 1.5, 0), order=0)
    assert set(np.unique(out)) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_zero_field_is_the_identity():
    image = np.random.default_rng(3).uniform(0, 1, (13, 11)).astype(np.float32)
    np.testing.assert_allclose(fields.warp(image, np.zeros((2, 13, 11), np.float32)), image, atol=1e-6)


# --- composition and inversion -----------------------------------------------------------------------------


def test_compose_with_inverse_is_zero_on_both_sides():
    u = _smooth((48, 48), 2.0, seed=4)
    w = fields.invert(u)
    inner = (slice(None), slice(6, -6), slice(6, -6))
    assert np.abs(fields.compose(u, w)[inner]).max() < 0.02
    assert np.abs(fields.compose(w, u)[inner]).max() < 0.05


def test_warping_by_u_then_inverse_restores_the_image():
    u = _smooth((48, 48), 2.0, seed=5)
    image = _smooth_image((48, 48))
    back = fields.warp(fields.warp(image, u), fields.invert(u))
    np.testing.assert_allclose(back[6:-6, 6:-6], image[6:-6, 6:-6], atol=0.5)


def test_warping_by_composition_equals_warping_by_u_then_v():
    u, v = _smooth((48, 48), 2.0, seed=6), _smooth((48, 48), 1.5, seed=7)
    image = _smooth_image((48, 48))
    twice = fields.warp(fields.warp(image, u), v)
    once = fields.warp(image, fields.compose(u, v))
    np.testing.assert_allclose(once[6:-6, 6:-6], twice[6:-6, 6:-6], atol=0.3)


def test_compose_of_constant_fields_adds_them_even_past_the_border():
    u, v = _constant((1.5, -2.0), (10, 12)), _constant((-30.0, 40.0), (10, 12))
    np.testing.assert_allclose(fields.compose(u, v), _constant((-28.5, 38.0), (10, 12)), atol=1e-4)


def test_compose_of_affine_fields_is_the_affine_product():
    m1, m2 = _affine(1.0, 1.01, (0.7, -0.4), 20.0), _affine(-0.5, 0.99, (-0.3, 0.6), 20.0)
    u, v = fields.affine_field(m1, (40, 40)), fields.affine_field(m2, (40, 40))
    product = np.vstack([m1, [0, 0, 1]]) @ np.vstack([m2, [0, 0, 1]])
    expected = fields.affine_field(product, (40, 40))
    np.testing.assert_allclose(fields.compose(u, v)[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-3)


@pytest.mark.parametrize("stride", [4, 8])
def test_compose_on_a_strided_grid_matches_the_affine_product(stride):
    shape = (12, 12)
    centre = (shape[0] - 1) * stride / 2
    m1, m2 = _affine(1.0, 1.01, (2.0, -3.0), centre), _affine(-0.8, 0.995, (-1.5, 2.5), centre)
    u, v = fields.affine_field(m1, shape, stride), fields.affine_field(m2, shape, stride)
    product = np.vstack([m1, [0, 0, 1]]) @ np.vstack([m2, [0, 0, 1]])
    expected = fields.affine_field(product, shape, stride)
    out = fields.compose(u, v, stride=stride)
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-3)


def test_compose_torch_matches_numpy_compose():
    u, v = _smooth((24, 24), 1.0, seed=8), _smooth((24, 24), 1.0, seed=9)
    batched = fields.compose_torch(torch.from_numpy(u)[None], torch.from_numpy(v)[None])
    np.testing.assert_allclose(batched[0].numpy(), fields.compose(u, v), atol=1e-5)


def test_invert_of_a_constant_shift_is_its_negative():
    np.testing.assert_allclose(fields.invert(_constant((2.5, -1.0), (8, 9))), _constant((-2.5, 1.0), (8, 9)), atol=1e-5)


def test_invert_works_for_3d_fields():
    shape = (8, 20, 20)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    u = np.stack([0.3 * np.sin(y / 6.0), np.cos(x / 7.0), 0.8 * np.sin((z + y) / 8.0)]).astype(np.float32)
    residual = fields.compose(u, fields.invert(u))
    assert np.abs(residual[:, 2:-2, 3:-3, 3:-3]).max() < 0.02


# --- changing grids ----------------------------------------------------------------------------------------


def test_rescale_upsampling_scales_the_values_corner_aligned():
    out = fields.rescale(_constant((1.0, 1.0), (32, 32)), (63, 63))
    assert out.shape == (2, 63, 63)
    np.testing.assert_allclose(out, 2.0, atol=1e-5)


def test_rescale_scales_each_axis_by_its_own_factor():
    out = fields.rescale(_constant((1.0, 1.0), (11, 21)), (21, 11))
    np.testing.assert_allclose(out[0], 2.0, atol=1e-5)
    np.testing.assert_allclose(out[1], 0.5, atol=1e-5)


def test_rescale_of_an_affine_field_is_the_affine_field_of_the_new_grid():
    matrix = _affine(2.0, 1.02, (1.0, -2.0), 15.0)
    coarse = fields.affine_field(matrix, (16, 16), stride=2.0)
    fine = fields.affine_field(matrix, (31, 31), stride=1.0)
    np.testing.assert_allclose(fields.rescale(coarse / 2.0, (31, 31)), fine, atol=1e-3)


def test_resample_keeps_values_and_samples_positions_i_times_stride():
    matrix = _affine(1.5, 1.01, (3.0, -2.0), 32.0)
    coarse = fields.affine_field(matrix, (9, 9), stride=8)  # covers 0..64
    fine = fields.resample(coarse, 8, 4, (17, 17))
    np.testing.assert_allclose(fine, fields.affine_field(matrix, (17, 17), stride=4), atol=1e-3)
    full = fields.resample(coarse, 8, 1, (65, 65))
    np.testing.assert_allclose(full, fields.affine_field(matrix, (65, 65)), atol=1e-3)


def test_resample_downsampling_picks_the_grid_points():
    matrix = _affine(-1.0, 0.99, (1.0, 2.0), 20.0)
    fine = fields.affine_field(matrix, (41, 41), stride=1)
    np.testing.assert_allclose(fields.resample(fine, 1, 10, (5, 5)), fine[:, ::10, ::10], atol=1e-4)


def test_resample_with_origin_returns_a_window_of_the_larger_grid():
    matrix = _affine(1.0, 1.0, (0.5, 1.0), 32.0)
    coarse = fields.affine_field(matrix, (9, 9), stride=8)
    origin = (8.0, 12.0)
    out = fields.resample(coarse, 8, 4, (10, 9), origin=origin)
    positions = np.stack(np.meshgrid(np.arange(10) * 4.0 + 8.0, np.arange(9) * 4.0 + 12.0, indexing="ij"))
    np.testing.assert_allclose(out, _affine_at(matrix, positions), atol=1e-3)


def test_resample_past_the_input_grid_uses_the_border_value():
    coarse = np.zeros((2, 3, 3), np.float32)
    coarse[0, -1, :] = 5.0
    out = fields.resample(coarse, 4, 4, (6, 3))
    np.testing.assert_allclose(out[0, 2:], 5.0)


# --- sampling, Jacobians -----------------------------------------------------------------------------------


def test_sample_reads_bilinear_values_and_cval_outside():
    image = _ramp((10, 12), (2.0, 0.5))
    coords = np.array([[[1.5, 3.25, 50.0]], [[2.0, 7.5, 1.0]]], np.float32)  # (2, 1, 3)
    out = fields.sample(image, coords, cval=-1.0)
    assert out.shape == (1, 3)
    np.testing.assert_allclose(out[0], [10 + 3 + 1.0, 10 + 6.5 + 3.75, -1.0], atol=1e-4)


def test_sample_nearest_rounds_to_the_closest_pixel():
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    coords = np.array([[[1.2, 2.8]], [[3.4, 0.6]]], np.float32)
    np.testing.assert_allclose(fields.sample(image, coords, order=0)[0], [image[1, 3], image[3, 1]])


def test_affine_field_of_the_identity_is_zero():
    np.testing.assert_allclose(fields.affine_field(np.eye(3), (5, 6), stride=4), 0.0)


def test_jacobian_determinant_of_an_affine_field_is_det_a():
    matrix = np.array([[1.1, 0.2, 3.0], [-0.1, 0.9, -2.0]])
    det = fields.jacobian_determinant(fields.affine_field(matrix, (12, 14)))
    assert det.shape == (12, 14)
    np.testing.assert_allclose(det, np.linalg.det(matrix[:, :2]), atol=1e-4)


def test_jacobian_determinant_of_a_3d_affine_field_is_det_a():
    matrix = np.array([[1.0, 0.1, 0.0, 1.0], [0.0, 1.2, 0.1, 0.0], [0.05, 0.0, 0.8, -1.0]])
    det = fields.jacobian_determinant(fields.affine_field(matrix, (5, 6, 7)))
    np.testing.assert_allclose(det, np.linalg.det(matrix[:, :3]), atol=1e-4)


def test_folding_percent_is_zero_without_folds_and_detects_a_fold():
    assert fields.folding_percent(_smooth((32, 32), 2.0, seed=10)) == 0.0
    y, x = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    fold = np.zeros((2, 32, 32), np.float32)
    fold[1] = 4.0 * np.exp(-((x - 16) ** 2) / 2.0)  # d(dx)/dx reaches about -2.4: the map folds
    percent = fields.folding_percent(fold)
    assert 0.0 < percent < 50.0
    mirror = fields.affine_field(np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 31.0]]), (8, 32))
    assert fields.folding_percent(mirror) == 100.0


# --- bad shapes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_shape", "field_shape"),
    [
        ((10, 10), (3, 10, 10)),  # channel count does not match the dimensionality
        ((10, 10), (2, 10, 11)),  # spatial shapes differ
        ((4, 10, 10), (2, 10, 10)),  # 2D field, 3D image
        ((10, 10), (2, 10)),  # not a field
        ((10, 10), (2, 1, 10, 10)),
    ],
)
def test_warp_rejects_mismatched_shapes(image_shape, field_shape):
    with pytest.raises(ValueError):
        fields.warp(np.zeros(image_shape, np.float32), np.zeros(field_shape, np.float32))


def test_warp_torch_rejects_mismatched_spatial_shapes():
    with pytest.raises(ValueError):
        fields.warp_torch(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 8, 9))


def test_field_functions_reject_bad_shapes():
    with pytest.raises(ValueError):
        fields.compose(np.zeros((2, 5, 5), np.float32), np.zeros((2, 5, 6), np.float32))
    for function in (fields.invert, fields.jacobian_determinant, fields.folding_percent):
        with pytest.raises(ValueError):
            function(np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError):
        fields.rescale(np.zeros((5, 5), np.float32), (10, 10))
    with pytest.raises(ValueError):
        fields.resample(np.zeros((1, 5, 5), np.float32), 2, 1, (10, 10))
