"""Registering a short in-memory stack (emalign.register_sections)."""

import numpy as np
import pytest
import torch

import emalign
from emalign import models
from emalign.errors import EmalignError
from emalign.fields import warp
from emalign.metrics import alignment_metrics, residual_fields
from emalign.register import _segments
from emalign.synth import demo_stack

torch.set_num_threads(1)

METHODS = [
    "stitched",
    "sequential",
]


@pytest.fixture(scope="module")
def demo():
    return demo_stack((12, 128, 128), seed=0)


@pytest.fixture(scope="module")
def unaligned_rms(demo):
    _, misaligned = demo
    return alignment_metrics(residual_fields(misaligned.fields, np.zeros_like(misaligned.fields)))["rms"]


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_register_sections_returns_aligned_stack_and_fields(demo, method):
    _, misaligned = demo
    result = emalign.register_sections(misaligned.stack, method=method, device="cpu")
    assert result.aligned.shape == misaligned.stack.shape and result.aligned.dtype == misaligned.stack.dtype
    assert result.fields.shape == (12, 2, 128, 128) and result.fields.dtype == np.float32
    assert np.isfinite(result.fields).all()
    z = 5
    expected = np.clip(np.rint(warp(misaligned.stack[z].astype(np.float32), result.fields[z])), 0, 255)
    np.testing.assert_array_equal(result.aligned[z], expected.astype(np.uint8))


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_register_sections_reduces_the_misalignment(demo, unaligned_rms, method):
    _, misaligned = demo
    result = emalign.register_sections(misaligned.stack, method=method, device="cpu")
    metrics = alignment_metrics(residual_fields(misaligned.fields, result.fields), estimate=result.fields)
    assert metrics["rms"] < 0.3 * unaligned_rms, metrics
    assert metrics["fail"] < 0.01 and metrics["fold"] < 1.0


@pytest.mark.e2e
def test_stitched_leaves_an_aligned_stack_nearly_unchanged(demo):
    aligned, _ = demo
    result = emalign.register_sections(aligned, method="stitched", device="cpu")
    zero = np.zeros_like(result.fields)
    assert alignment_metrics(residual_fields(zero, result.fields))["rms"] < 2.0


@pytest.mark.e2e
def test_register_sections_keeps_float_dtype_and_accepts_a_loaded_model(demo):
    _, misaligned = demo
    stack = misaligned.stack[:4].astype(np.float32)
    result = emalign.register_sections(stack, model=models.load("faemreg-small"), method="sequential")
    assert result.aligned.dtype == np.float32 and result.aligned.shape == stack.shape


@pytest.mark.e2e
def test_register_sections_drops_a_singleton_channel_axis(demo):
    _, misaligned = demo
    stack = misaligned.stack[:3, None]
    result = emalign.register_sections(stack, method="sequential", device="cpu")
    assert result.aligned.shape == (3, 128, 128)


def _nan_stack() -> np.ndarray:
    stack = np.ones((4, 32, 32), np.float32)
    stack[2, 5, 5] = np.nan
    return stack


@pytest.mark.parametrize(
    ("stack", "kwargs", "match"),
    [
        (np.ones((32, 32), np.uint8), {}, "2D"),
        (np.ones((4, 3, 32, 32), np.uint8), {}, "channel"),
        (_nan_stack(), {}, "NaN"),
        (np.ones((0, 32, 32), np.uint8), {}, "empty"),
        (np.ones((4, 32, 32), np.uint8), {"model": "nope"}, "unknown model"),
        (np.ones((4, 32, 32), np.uint8), {"method": "diagonal"}, "method"),
    ],
    ids=["2d", "channels", "nan", "empty", "unknown-model", "unknown-method"],
)
def test_register_sections_rejects_bad_input_with_a_one_line_message(stack, kwargs, match):
    with pytest.raises(EmalignError, match=match) as info:
        emalign.register_sections(stack, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.e2e
def test_stitched_registration_gives_the_fields_of_emalign_align(demo, tmp_path):
    import tifffile

    from emalign.pipeline import AlignParams, align
    from emalign.register import full_resolution_fields

    _, misaligned = demo
    tifffile.imwrite(tmp_path / "raw.tif", misaligned.stack)
    ws, _, _ = align(tmp_path / "raw.tif", tmp_path / "out.zarr", AlignParams(stride=4), device="cpu", progress=False)
    result = emalign.register_sections(misaligned.stack, method="stitched", device="cpu", stride=4)
    np.testing.assert_allclose(result.fields, full_resolution_fields(ws), atol=1e-3)


@pytest.mark.e2e
def test_sequential_error_does_not_grow_along_z():
    _, misaligned = demo_stack((40, 128, 128), seed=3)
    result = emalign.register_sections(misaligned.stack, method="sequential", device="cpu")
    metrics = alignment_metrics(residual_fields(misaligned.fields, result.fields))
    # the network chained onto a rigid chain (no leash) gave 19 px rms here, growing 0.4 px per section
    assert metrics["rms"] < 2.5 and abs(metrics["slope"]) < 0.05, metrics


def test_sequential_passes_start_again_at_breaks_and_skip_excluded_sections():
    excluded = np.array([False, True, False, False, False, True, False])
    assert _segments(excluded, (3,)) == [[0, 2], [3, 4, 6]]
    assert _segments(np.ones(3, bool), ()) == []


@pytest.mark.e2e
def test_sequential_leaves_a_blank_section_blank_and_aligns_across_it(demo, unaligned_rms):
    _, misaligned = demo
    stack = misaligned.stack.copy()
    stack[6] = 0
    result = emalign.register_sections(stack, method="sequential", device="cpu")
    assert not result.aligned[6].any()
    metrics = alignment_metrics(residual_fields(misaligned.fields, result.fields), exclude=[6])
    assert metrics["rms"] < 0.3 * unaligned_rms, metrics


@pytest.mark.e2e
def test_register_sections_reports_each_stage_and_takes_pipeline_options(demo):
    _, misaligned = demo
    seen = []

    def report(done: int, total: int) -> None:
        seen.append((done, total))

    result = emalign.register_sections(misaligned.stack[:6], device="cpu", polish="off", stride=16, report=report)
    assert seen == [(i, 5) for i in range(1, 6)] and result.fields.shape == (6, 2, 128, 128)
    with pytest.raises(EmalignError, match="unknown option") as info:
        emalign.register_sections(misaligned.stack[:6], device="cpu", strides=16)
    assert "\n" not in str(info.value)
