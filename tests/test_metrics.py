import numpy as np
import pytest

from emalign import fields
from emalign.errors import EmalignError
from emalign.metrics import (
    adjacent_correlation,
    alignment_metrics,
    format_metrics,
    imaged,
    residual_fields,
    residual_parts,
)
from emalign.synth import misalign, random_smooth_field


def _constant(shifts: np.ndarray, shape: tuple[int, int] = (40, 50)) -> np.ndarray:
    """(Z, 2, Y, X) fields that are constant per section."""
    shifts = np.asarray(shifts, dtype=np.float32)
    return np.broadcast_to(shifts[:, :, None, None], (len(shifts), 2, *shape)).copy()


@pytest.fixture(scope="module")
def misaligned():
    stack = np.random.default_rng(0).integers(0, 255, (6, 64, 64)).astype(np.uint8)
    return misalign(stack, seed=3, shift=6.0, rotation_deg=1.0, scale=0.01, elastic=1.5, elastic_length=30.0)


def test_residual_is_zero_for_the_inverse_estimate(misaligned):
    estimate = np.stack([fields.invert(a) for a in misaligned.fields])
    residual = residual_fields(misaligned.fields, estimate)
    assert residual.shape == misaligned.fields.shape and residual.dtype == np.float32
    assert np.abs(residual[:, :, 8:-8, 8:-8]).max() < 0.05


def test_perfect_estimate_gives_zero_metrics(misaligned):
    estimate = np.stack([fields.invert(a) for a in misaligned.fields])
    m = alignment_metrics(residual_fields(misaligned.fields, estimate), estimate=estimate)
    assert set(m) == {"rms", "adj", "drift", "fail", "fold", "slope"}
    assert m["rms"] < 0.05 and m["adj"] < 0.05 and m["drift"] < 0.05
    assert m["fail"] == 0.0 and m["fold"] == 0.0 and abs(m["slope"]) < 0.01


def test_no_alignment_leaves_the_misalignment(misaligned):
    m = alignment_metrics(residual_fields(misaligned.fields, np.zeros_like(misaligned.fields)))
    assert m["rms"] > 3.0 and m["adj"] > m["rms"]


def test_residual_composes_truth_then_estimate():
    truth = _constant([[1.0, -2.0], [0.5, 0.0]])
    estimate = _constant([[-0.5, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(residual_fields(truth, estimate), _constant([[0.5, 1.0], [0.5, 0.0]]), atol=1e-6)


def test_pure_per_section_shift_metrics_are_exact():
    # zero mean and zero linear trend in z, so nothing is removed: rms = drift = 1, adj = sqrt(8/3)
    m = alignment_metrics(_constant([[1, 0], [-1, 0], [-1, 0], [1, 0]]))
    assert m["rms"] == pytest.approx(1.0, abs=1e-6)
    assert m["drift"] == pytest.approx(1.0, abs=1e-6)
    assert m["adj"] == pytest.approx(np.sqrt(8 / 3), abs=1e-6)
    assert m["fail"] == 0.0 and m["slope"] == pytest.approx(0.0, abs=1e-6)


def test_shared_field_and_constant_offset_are_not_penalised():
    shared = random_smooth_field((40, 50), 3.0, 10.0, np.random.default_rng(0))
    residuals = _constant(np.zeros((5, 2))) + shared + np.float32(30.0)
    m = alignment_metrics(residuals, fail_px=5.0)
    assert m["rms"] < 1e-5 and m["adj"] < 1e-5 and m["drift"] < 1e-5 and m["fail"] == 0.0


def test_linear_shear_in_z_is_not_penalised():
    z = np.arange(20, dtype=np.float32)
    shared = random_smooth_field((40, 50), 2.0, 10.0, np.random.default_rng(1))
    residuals = _constant(np.stack([0.5 * z, -2.0 * z + 3.0], axis=1)) + shared
    m = alignment_metrics(residuals, fail_px=5.0)
    assert m["rms"] < 1e-4 and m["adj"] < 1e-4 and m["drift"] < 1e-4
    assert m["fail"] == 0.0


def test_drift_growing_with_z_is_penalised_and_has_positive_slope():
    z = np.arange(30, dtype=np.float32)
    walk = _constant(np.stack([0.02 * (z - 15) ** 2, np.zeros_like(z)], axis=1))
    m = alignment_metrics(walk)
    assert m["drift"] > 1.0 and m["rms"] == pytest.approx(m["drift"], rel=1e-5)
    noise = np.random.default_rng(0).normal(size=(30, 2, 40, 50)).astype(np.float32)
    growing = noise * (0.1 + 0.1 * z)[:, None, None, None]
    assert alignment_metrics(growing)["slope"] == pytest.approx(0.1 * np.sqrt(2), rel=0.1)


def test_margin_ignores_the_border():
    residuals = np.zeros((4, 2, 50, 50), dtype=np.float32)
    residuals[1, :, :4] = 100.0
    assert alignment_metrics(residuals, margin=0.1)["rms"] == 0.0
    assert alignment_metrics(residuals, margin=0.0)["rms"] > 1.0


def test_fail_counts_pixels_beyond_fail_px():
    residuals = np.zeros((4, 2, 40, 40), dtype=np.float32)
    residuals[1, 0, :, :20] = 80.0
    residuals[2, 0, :, :20] = -80.0
    m = alignment_metrics(residuals, margin=0.0, fail_px=25.0)
    assert m["fail"] == pytest.approx(0.25)


def test_excluded_sections_are_left_out():
    residuals = _constant([[1, 0], [-1, 0], [50, 50], [-1, 0], [1, 0]])
    m = alignment_metrics(residuals, exclude=[2])
    reference = alignment_metrics(_constant([[1, 0], [-1, 0], [-1, 0], [1, 0]]))
    assert m["adj"] == pytest.approx(reference["adj"], abs=1e-6)
    assert m["drift"] == pytest.approx(reference["drift"], abs=1e-6)
    assert m["fail"] == 0.0
    with pytest.raises(EmalignError, match="excluded"):
        alignment_metrics(residuals, exclude=range(5))


def test_fold_reports_folded_estimates():
    estimate = np.zeros((3, 2, 20, 20), dtype=np.float32)
    estimate[1, 1] = -2.0 * np.arange(20, dtype=np.float32)  # x -> -x: everywhere folded
    m = alignment_metrics(np.zeros_like(estimate), estimate=estimate)
    assert m["fold"] == pytest.approx(100.0 / 3)


def test_bad_shapes_are_rejected():
    with pytest.raises(EmalignError):
        alignment_metrics(np.zeros((3, 3, 8, 8)))
    with pytest.raises(EmalignError):
        residual_fields(np.zeros((3, 2, 8, 8)), np.zeros((2, 2, 8, 8)))


def test_format_metrics_is_one_line():
    line = format_metrics({"rms": 1.234, "adj": 0.98, "drift": 0.4, "fail": 0.0, "fold": 0.0, "slope": 0.001})
    assert line == "rms 1.23 px | adj 0.98 px | drift 0.40 px | fail 0.0% | fold 0.00% | slope +0.001 px/section"


def test_adjacent_correlation_uses_pixels_valid_in_both():
    rng = np.random.default_rng(0)
    base = rng.random((32, 32)) + 0.5
    stack = np.stack([base, base, 2 * base + 1, -base + 3, np.zeros_like(base)])
    stack[1, :16] = 0  # out-of-image area: ignored
    corr = adjacent_correlation(stack)
    assert corr.shape == (4,)
    np.testing.assert_allclose(corr[:3], [1.0, 1.0, -1.0])
    assert np.isnan(corr[3])
    mask = np.ones((32, 32), dtype=bool)
    assert adjacent_correlation(stack[:2], mask=mask)[0] < 1.0


def test_residual_parts_split_translation_linear_and_non_affine_exactly():
    shape = (40, 50)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    ramp = xx - xx.mean()  # zero mean: orthogonal to a translation
    ripple = np.sin(2 * np.pi * yy / shape[0]) * np.sin(2 * np.pi * xx / shape[1])  # orthogonal to any affine map
    weights = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])[:, None, None, None]  # zero mean over z: nothing shared
    translation = weights * np.array([1.0, 0.5])[None, :, None, None] * np.ones(shape)
    linear = weights * np.stack([0.1 * ramp, -0.05 * ramp])[None]
    non_affine = weights * 0.7 * np.stack([ripple, ripple])[None]

    def rms(part):
        return np.sqrt(np.mean(np.sum(part**2, axis=1)))

    parts = residual_parts((translation + linear + non_affine).astype(np.float32), margin=0.0)
    assert parts["translation"] == pytest.approx(rms(translation), rel=1e-4)
    assert parts["linear"] == pytest.approx(rms(linear), rel=1e-4)
    assert parts["non-affine"] == pytest.approx(rms(non_affine), rel=1e-4)
    shared = residual_parts(np.broadcast_to(non_affine[1:2] + translation[:1], (5, 2, *shape)), margin=0.0)
    assert max(shared.values()) < 1e-5  # a field every section has is not a residual


def test_imaged_is_false_where_a_shift_moved_the_section_out_of_the_frame():
    truth = np.zeros((2, 2, 30, 40), np.float32)
    truth[1, 1] = 10.0  # raw_1(q) = true_1(q + 10 in x): true pixels x < 10 were never imaged
    seen = imaged(truth)
    assert seen.shape == (2, 30, 40) and seen[0].all()
    assert not seen[1, :, :9].any() and seen[1, :, 11:].all()


def test_metrics_measure_only_the_pixels_that_were_imaged():
    residuals = np.zeros((4, 2, 40, 50), np.float32)
    residuals[2, :, :, :20] = 30.0  # section 2 is wrong only where it has no data
    seen = np.ones((4, 40, 50), bool)
    seen[2, :, :20] = False
    everywhere = alignment_metrics(residuals, fail_px=5.0)
    measured = alignment_metrics(residuals, fail_px=5.0, seen=seen)
    assert everywhere["rms"] > 5 and everywhere["adj"] > 5 and everywhere["fail"] > 0
    assert measured["rms"] < 1e-6 and measured["adj"] < 1e-6 and measured["drift"] < 1e-6 and measured["fail"] == 0


def test_metrics_with_every_pixel_seen_equal_those_without_a_mask(misaligned):
    residual = residual_fields(misaligned.fields, np.zeros_like(misaligned.fields))
    plain = alignment_metrics(residual, exclude=[2])
    masked = alignment_metrics(residual, exclude=[2], seen=np.ones((6, 64, 64), bool))
    assert masked == pytest.approx(plain, rel=1e-5)


def test_metrics_reject_a_mask_of_the_wrong_shape_or_one_with_nothing_seen():
    residuals = np.zeros((3, 2, 20, 20), np.float32)
    with pytest.raises(EmalignError, match="seen shape"):
        alignment_metrics(residuals, seen=np.ones((3, 10, 20), bool))
    with pytest.raises(EmalignError, match="nothing to measure"):
        alignment_metrics(residuals, seen=np.zeros((3, 20, 20), bool))
