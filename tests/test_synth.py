import numpy as np
import pytest

from emalign import fields
from emalign.errors import EmalignError
from emalign.synth import CRACK_WIDTH, Misaligned, demo_stack, em_texture, misalign, random_affine, random_smooth_field


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return em_texture((12, 96, 96), seed=3)


def test_em_texture_is_uint8_of_the_requested_shape_with_contrast(volume):
    assert volume.shape == (12, 96, 96) and volume.dtype == np.uint8
    assert 90 < volume.mean() < 170
    assert volume.std() > 20


def test_em_texture_is_reproducible_and_seed_dependent(volume):
    np.testing.assert_array_equal(em_texture((12, 96, 96), seed=3), volume)
    assert _corr(em_texture((2, 96, 96), seed=4)[0], volume[0]) < 0.3


def test_em_texture_does_not_depend_on_the_number_of_workers(volume):
    np.testing.assert_array_equal(em_texture((12, 96, 96), seed=3, workers=4), volume)


def test_em_texture_adjacent_sections_correlate_more_than_distant(volume):
    near = np.mean([_corr(volume[z], volume[z + 1]) for z in range(len(volume) - 1)])
    far = np.mean([_corr(volume[z], volume[z + 10]) for z in range(len(volume) - 10)])
    assert near > 0.7
    assert far < near - 0.15


def test_em_texture_neighbours_differ(volume):
    assert np.mean(np.abs(volume[1].astype(int) - volume[0])) > 5


def test_z_step_makes_neighbours_less_similar():
    slow = em_texture((4, 96, 96), seed=1, z_step=1.0)
    fast = em_texture((4, 96, 96), seed=1, z_step=4.0)
    assert _corr(fast[0], fast[1]) < _corr(slow[0], slow[1]) - 0.1


def test_em_texture_has_thin_dark_membranes():
    clean = em_texture((1, 128, 128), seed=2, noise=0.0)[0].astype(np.float64)
    dark = clean < 0.7 * np.median(clean)
    assert 0.05 < dark.mean() < 0.35


def test_random_smooth_field_has_requested_rms():
    u = random_smooth_field((80, 120), 2.5, 30.0, np.random.default_rng(0))
    assert u.shape == (2, 80, 120) and u.dtype == np.float32
    np.testing.assert_allclose(np.sqrt(np.mean(u.astype(np.float64) ** 2, axis=(1, 2))), 2.5, rtol=1e-4)


def test_random_smooth_field_has_requested_correlation_length():
    length = 6.0
    u = random_smooth_field((256, 256), 1.0, length, np.random.default_rng(1)).astype(np.float64)
    u -= u.mean(axis=(1, 2), keepdims=True)
    lag = int(length)
    at_lag = np.mean(u[:, :, lag:] * u[:, :, :-lag]) / np.mean(u**2)
    assert 0.45 < at_lag < 0.75  # exp(-1/2) = 0.61 for a Gaussian covariance


def test_random_smooth_field_zero_amplitude_is_zero():
    assert not np.any(random_smooth_field((16, 16), 0.0, 10.0, np.random.default_rng(0)))


def test_random_affine_rotates_about_the_centre():
    center = (40.0, 60.0)
    m = random_affine(np.random.default_rng(0), shift=0.0, rotation_deg=5.0, scale=0.0, center=center)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[:, :2] @ np.array(center) + m[:, 2], center, atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(m[:, :2]), 1.0, atol=1e-9)
    assert abs(m[0, 1]) > 1e-3


def test_random_affine_shift_has_requested_spread():
    rng = np.random.default_rng(0)
    shifts = np.array([random_affine(rng, 15.0, 0.0, 0.0, (0.0, 0.0))[:, 2] for _ in range(2000)])
    np.testing.assert_allclose(shifts.std(axis=0), 15.0, rtol=0.08)


def test_misalign_fields_reproduce_the_raw_stack(volume):
    result = misalign(volume, seed=5)
    assert isinstance(result, Misaligned)
    assert result.stack.dtype == np.uint8 and result.stack.shape == volume.shape
    assert result.fields.shape == (12, 2, 96, 96) and result.fields.dtype == np.float32
    for z in range(len(volume)):
        expected = np.clip(np.round(fields.warp(volume[z], result.fields[z])), 0, 255)
        np.testing.assert_array_equal(result.stack[z], expected)


def test_misalign_pulls_content_from_p_plus_the_field():
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    stack = np.stack([yy + 2 * xx] * 3)  # a linear ramp: bilinear sampling of it is exact
    result = misalign(stack, seed=1, shift=4.0, rotation_deg=0.0, scale=0.0, elastic=0.0)
    for z in range(3):
        dy, dx = result.fields[z, :, 0, 0]
        np.testing.assert_allclose(result.fields[z], np.broadcast_to(result.fields[z, :, :1, :1], (2, 64, 64)))
        # raw(q) = true(q + a), so inside the image raw - true = dy + 2 dx
        np.testing.assert_allclose((result.stack[z] - stack[z])[20:44, 20:44], dy + 2 * dx, atol=1e-3)


def test_compression_scales_each_section_by_exactly_one_minus_c_along_its_own_direction():
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    stack = np.stack([yy + 2 * xx] * 6)  # a linear ramp: bilinear sampling of it is exact
    result = misalign(stack, seed=3, shift=0.0, rotation_deg=0.0, scale=0.0, elastic=0.0, compression=0.03)
    directions = []
    for z in range(6):
        mapped = result.fields[z].astype(np.float64) + np.mgrid[:64, :64]  # q = A p + t at every pixel
        a = np.stack([mapped[:, 1, 0] - mapped[:, 0, 0], mapped[:, 0, 1] - mapped[:, 0, 0]], axis=1)
        np.testing.assert_allclose(
            mapped, np.einsum("ij,jyx->iyx", a, np.mgrid[:64, :64]) + mapped[:, :1, :1], atol=1e-4
        )
        np.testing.assert_allclose(np.linalg.svd(a, compute_uv=False), [1.0, 0.97], atol=1e-5)
        values, vectors = np.linalg.eigh(a)  # symmetric: a pure compression, no rotation
        np.testing.assert_allclose(a, a.T, atol=1e-5)
        directions.append(np.degrees(np.arctan2(*vectors[:, np.argmin(values)])) % 180)
        # the raw section is the true one sampled through the same affine map
        np.testing.assert_allclose(result.stack[z][20:44, 20:44], (mapped[0] + 2 * mapped[1])[20:44, 20:44], atol=1e-3)
    assert np.ptp(directions) > 20  # a random direction per section


def test_compression_is_off_by_default_and_changes_the_fields_when_set(volume):
    plain, zero = misalign(volume, seed=4), misalign(volume, seed=4, compression=0.0)
    np.testing.assert_array_equal(plain.fields, zero.fields)
    np.testing.assert_array_equal(plain.stack, zero.stack)
    assert not np.array_equal(misalign(volume, seed=4, compression=0.02).fields[1:], plain.fields[1:])


def test_misalign_has_requested_misalignment_and_zero_fill(volume):
    result = misalign(volume, seed=2, shift=10.0, elastic=2.0)
    mean_shift = result.fields.mean(axis=(2, 3))
    assert 3.0 < np.sqrt(np.mean(mean_shift**2)) < 25.0
    elastic = result.fields - result.fields.mean(axis=(2, 3), keepdims=True)
    assert 0.5 < np.sqrt(np.mean(elastic**2)) < 5.0
    big = np.argmax(np.abs(mean_shift[:, 0]))
    row = 0 if mean_shift[big, 0] < 0 else -1
    assert np.all(result.stack[big, row] == 0)


def test_misalign_preserves_float_and_uint16_dtypes():
    stack = (np.random.default_rng(0).random((3, 32, 32)) * 60000).astype(np.uint16)
    assert misalign(stack, seed=0).stack.dtype == np.uint16
    assert misalign(stack.astype(np.float32), seed=0).stack.dtype == np.float32


def test_artifact_flags(volume):
    result = misalign(volume, seed=7, shift=2.0, artifacts=("blank", "low_contrast", "noisy"))
    flagged = {flag: z for z, flag in enumerate(result.flags) if flag}
    assert len(result.flags) == len(volume)
    assert set(flagged) == {"blank", "low_contrast", "noisy"}
    assert 0 not in flagged.values() and len(volume) - 1 not in flagged.values()
    clean = misalign(volume, seed=7, shift=2.0)
    assert not any(clean.flags)
    assert not np.any(result.stack[flagged["blank"]])
    std = {z: result.stack[z][16:-16, 16:-16].std() for z in flagged.values()}
    reference = clean.stack[flagged["low_contrast"]][16:-16, 16:-16].std()
    assert std[flagged["low_contrast"]] < 0.3 * reference
    assert std[flagged["noisy"]] > 1.2 * clean.stack[flagged["noisy"]][16:-16, 16:-16].std()


def test_unknown_artifact_and_too_few_sections_are_rejected(volume):
    with pytest.raises(EmalignError, match="unknown artifacts"):
        misalign(volume, artifacts=("smudge",))
    with pytest.raises(EmalignError, match="sections"):
        misalign(volume[:3], artifacts=("blank", "noisy"))


def test_demo_stack_returns_aligned_and_misaligned():
    aligned, result = demo_stack(shape=(4, 64, 64), seed=1)
    assert aligned.shape == (4, 64, 64) and aligned.dtype == np.uint8
    assert result.stack.shape == aligned.shape and result.fields.shape == (4, 2, 64, 64)
    assert result.flags == ["", "", "", ""]


def test_a_crack_tears_a_section_and_its_truth_follows_the_moved_piece(volume):
    clean = misalign(volume, seed=7, shift=2.0)
    torn = misalign(volume, seed=7, shift=2.0, artifacts=("crack",))
    z = torn.flags.index("crack")
    others = [i for i in range(len(volume)) if i != z]
    np.testing.assert_array_equal(torn.stack[others], clean.stack[others])
    white = np.flatnonzero((torn.stack[z] == 255).all(axis=1))  # the crack, saturated across the section
    assert len(white) == CRACK_WIDTH and np.all(np.diff(white) == 1)
    top, below = int(white[0]), int(white[-1]) + 1
    np.testing.assert_array_equal(torn.fields[z][:, :top], clean.fields[z][:, :top])
    inner = (slice(below + 8, -8), slice(8, -8))
    jump = (torn.fields[z][(slice(None), *inner)] - clean.fields[z][(slice(None), *inner)]).mean(axis=(1, 2))
    assert 2.8 < np.hypot(*jump) < 6.2
    raw = torn.stack[z][inner].astype(np.float32)
    exact = np.abs(fields.warp(volume[z], torn.fields[z])[inner] - raw).mean()
    untorn = np.abs(fields.warp(volume[z], clean.fields[z])[inner] - raw).mean()
    assert exact < 0.25 * untorn  # the moved piece is where its ground truth says
