"""FAEMReg networks, their building blocks and losses (emalign/models/)."""

import numpy as np
import pytest
import torch

from emalign import models
from emalign.errors import EmalignError
from emalign.fields import warp, warp_torch
from emalign.models import faemreg, losses
from emalign.models.faemreg import local_correlation, normalize_sections, parameter_count, soft_argmax_flow

torch.set_num_threads(1)


def _smooth_image(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A smooth random image with structure at a few-pixel scale."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, shape[0] // 4 + 2, shape[1] // 4 + 2, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0, 0]


# --- architecture ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 7, 100, 90), (2, 7, 37, 53), (1, 7, 64, 64)])
def test_small_model_returns_a_field_of_the_input_size(shape):
    model = models.build("faemreg-small").eval()
    with torch.no_grad():
        out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 2, *shape[2:])
    assert torch.isfinite(out).all()


def test_paper_model_has_about_24_million_parameters_and_runs():
    model = models.build("faemreg-paper").eval()
    assert abs(parameter_count(model) - 24e6) < 0.1 * 24e6
    with torch.no_grad():
        out = model(torch.randn(1, 7, 64, 64))
    assert out.shape == (1, 2, 64, 64)


def test_small_model_is_small():
    assert parameter_count(models.build("faemreg-small")) < 1e6


@pytest.mark.parametrize("shape", [(1, 5, 64, 64), (1, 9, 64, 64), (7, 64, 64), (1, 1, 7, 64, 64)])
def test_wrong_depth_or_rank_raises_value_error(shape):
    with pytest.raises(ValueError, match="expects"):
        models.build("faemreg-small")(torch.zeros(*shape))


def test_blank_stack_gives_a_finite_field():
    model = models.build("faemreg-small").eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 7, 48, 48))
    assert torch.isfinite(out).all()


def test_config_round_trips_through_a_dict():
    for config in models.CONFIGS.values():
        assert faemreg.FAEMRegConfig.from_dict(config.to_dict()) == config
    assert models.CONFIGS["faemreg-paper"].depth == 7


def test_build_unknown_name_raises_emalign_error():
    with pytest.raises(EmalignError, match="unknown model"):
        models.build("nope")


# --- correlation and soft-argmax ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [(0, 2), (-1, 3), (2, -2), (0, 0)])
def test_local_correlation_peaks_at_the_known_offset(offset):
    radius = 3
    moving = torch.randn(1, 8, 20, 24, generator=torch.Generator().manual_seed(0))
    other = torch.randn(1, 8, 20, 24, generator=torch.Generator().manual_seed(1))
    shifted = torch.roll(moving, shifts=offset, dims=(-2, -1))  # shifted(p + o) = moving(p)
    stack = torch.stack([other, shifted, moving], 2)  # (1, C, 3, H, W)
    costs = local_correlation(moving, stack, radius)
    assert costs.shape == (1, (2 * radius + 1) ** 2, 3, 20, 24)
    inner = costs[..., radius:-radius, radius:-radius]
    expected = (offset[0] + radius) * (2 * radius + 1) + (offset[1] + radius)
    assert (inner[:, :, 1].argmax(1) == expected).all()
    torch.testing.assert_close(inner[:, expected, 1], torch.ones_like(inner[:, expected, 1]), atol=1e-4, rtol=0)
    centre = radius * (2 * radius + 1) + radius
    assert (inner[:, :, 2].argmax(1) == centre).all()  # the moving map itself: zero offset
    assert inner.abs().max() <= 1 + 1e-5


def test_soft_argmax_flow_pulls_the_moving_section_by_minus_the_offset():
    """A reference showing the moving content moved by +2 px in x needs the pull field dx = -2."""
    radius = 3
    moving = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = torch.roll(moving, shifts=(0, 2), dims=(-2, -1))  # reference(p + (0, 2)) = moving(p)
    costs = local_correlation(moving, reference.unsqueeze(2), radius)
    flow = soft_argmax_flow(costs, radius, torch.tensor(50.0))[:, :, 0]
    assert flow.shape == (1, 2, 32, 32)
    inner = flow[..., 4:-4, 4:-4]
    torch.testing.assert_close(inner[:, 0], torch.zeros_like(inner[:, 0]), atol=0.05, rtol=0)
    torch.testing.assert_close(inner[:, 1], torch.full_like(inner[:, 1], -2.0), atol=0.05, rtol=0)
    # and that is the pull field that lines the moving section up with the reference
    warped = warp_torch(moving, flow)
    torch.testing.assert_close(warped[..., 4:-4, 4:-4], reference[..., 4:-4, 4:-4], atol=0.05, rtol=0)


def test_soft_argmax_flow_of_a_flat_cost_is_zero():
    costs = torch.zeros(1, 9, 2, 5, 5)
    torch.testing.assert_close(soft_argmax_flow(costs, 1, torch.tensor(10.0)), torch.zeros(1, 2, 2, 5, 5))


def test_box_sum_adds_each_pixels_zero_padded_neighbourhood():
    images = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(4))
    sums = faemreg.box_sum(images, 3)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    assert sums.shape == images.shape
    torch.testing.assert_close(sums[1, 2, 3, 4], padded[1, 2, 3:6, 4:7].sum())
    torch.testing.assert_close(sums[0, 0, 0, 0], images[0, 0, :2, :2].sum())  # corner: zeros beyond the border


def test_patch_correlation_is_the_ncc_of_zero_padded_patches():
    """Box-sum NCC equals correlating explicit, centred, unit-length 5 x 5 patch vectors (borders included)."""
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(1, 2, 12, 13, generator=gen)
    images[:, :, :3] = 0  # no data: flat patches score 0
    moving = torch.randn(1, 12, 13, generator=gen)
    radius, size = 2, 5
    costs = faemreg.patch_correlation(moving, images, radius, size)
    assert costs.shape == (1, 25, 2, 12, 13)

    def patch(image, y, x):
        padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
        vector = padded[y : y + size, x : x + size].reshape(-1)
        vector = vector - vector.mean()
        norm = vector.norm()
        return vector / norm if norm > 1e-3 else torch.zeros_like(vector)

    for y, x, dy, dx, d in [(5, 6, 1, -2, 0), (0, 0, 0, 0, 1), (11, 12, -2, 1, 1), (3, 4, -1, 0, 0), (1, 1, -2, -2, 0)]:
        inside = 0 <= y + dy < 12 and 0 <= x + dx < 13
        expected = patch(moving[0], y, x) @ patch(images[0, d], y + dy, x + dx) if inside else torch.tensor(0.0)
        got = costs[0, (dy + radius) * (2 * radius + 1) + dx + radius, d, y, x]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_depth_head_equals_the_depth_spanning_convolution():
    head = torch.nn.Conv3d(6, 2, (5, 3, 3), padding=(0, 1, 1))
    feats = torch.randn(2, 6, 5, 9, 11, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(faemreg.depth_head(feats, head), head(feats).squeeze(2), atol=1e-5, rtol=0)


def test_normalize_sections_keeps_zeros_and_standardises_valid_pixels():
    gen = torch.Generator().manual_seed(3)
    stack = torch.rand(2, 3, 16, 16, generator=gen) * 200 + 20
    stack[:, :, :4] = 0  # no data
    stack[1, 2] = 0  # a blank section
    out = normalize_sections(stack.to(torch.uint8))
    assert out.dtype == torch.float32 and out.shape == stack.shape
    assert (out[:, :, :4] == 0).all() and (out[1, 2] == 0).all()
    valid = out[0, 1, 4:]
    assert abs(float(valid.mean())) < 1e-4
    assert abs(float(valid.std(unbiased=False)) - 1.0) < 1e-3


# --- losses ------------------------------------------------------------------------------------------------


def test_local_ncc_is_zero_for_identical_images_and_large_for_unrelated_ones():
    a = _smooth_image((40, 40), seed=4)[None, None]
    b = _smooth_image((40, 40), seed=5)[None, None]
    assert float(losses.local_ncc(a, a)) < 1e-3
    assert float(losses.local_ncc(a, b)) > 0.5


def test_local_ncc_is_invariant_to_gain_and_offset():
    a = _smooth_image((40, 40), seed=6)[None]  # (N, H, W) is accepted too
    assert float(losses.local_ncc(a, 3.0 * a + 5.0)) < 1e-3
    assert float(losses.local_ncc(a, -a)) > 1.9  # anti-correlated: 2


def test_local_ncc_ignores_masked_pixels():
    a = _smooth_image((40, 40), seed=7)[None, None]
    b = a.clone()
    b[..., 20:] = _smooth_image((40, 40), seed=8)[None, None][..., 20:]
    mask = torch.zeros_like(a)
    mask[..., :20] = 1
    assert float(losses.local_ncc(a, b)) > 0.2
    assert float(losses.local_ncc(a, b, mask)) < 1e-3


def test_endpoint_error_is_the_mean_euclidean_distance():
    pred = torch.zeros(1, 2, 4, 6)
    target = torch.zeros(1, 2, 4, 6)
    target[:, 0], target[:, 1] = 3.0, 4.0
    assert abs(float(losses.endpoint_error(pred, target)) - 5.0) < 1e-4
    target[..., :3] = 0.0  # half the pixels right
    assert abs(float(losses.endpoint_error(pred, target)) - 2.5) < 1e-3
    mask = torch.zeros(1, 4, 6)
    mask[..., 3:] = 1
    assert abs(float(losses.endpoint_error(pred, target, mask)) - 5.0) < 1e-4


def test_smoothness_is_zero_for_constant_fields_and_penalises_gradients():
    assert float(losses.smoothness(torch.full((2, 2, 8, 8), 3.7))) == 0.0
    ramp = torch.zeros(1, 2, 8, 8)
    ramp[:, 0] = torch.arange(8.0)  # d(dy)/dx = 1, the rest 0
    assert abs(float(losses.smoothness(ramp)) - 0.25) < 1e-6


def test_reference_similarity_skips_all_zero_references():
    warped = _smooth_image((32, 32), seed=9)[None]
    near = _smooth_image((32, 32), seed=10)[None]
    blank = torch.zeros_like(near)
    alone = losses.reference_similarity(warped, near[:, None])
    with_blanks = losses.reference_similarity(warped, torch.stack([near, blank, blank], 1))
    torch.testing.assert_close(with_blanks, alone)
    assert float(losses.reference_similarity(warped, torch.stack([warped, blank], 1))) < 1e-3


def test_reference_similarity_weights_references_by_distance():
    warped = _smooth_image((32, 32), seed=11)[None]
    refs = torch.stack([warped, _smooth_image((32, 32), seed=12)[None]], 1)
    far = float(losses.local_ncc(warped, refs[:, 1], (refs[:, 1] != 0).float()))
    expected = (1.0 * 0.0 + 0.5 * far) / 1.5
    assert abs(float(losses.reference_similarity(warped, refs)) - expected) < 1e-3


# --- loading and saving ------------------------------------------------------------------------------------


def test_load_shipped_small_model():
    model = models.load("faemreg-small")
    assert isinstance(model, faemreg.FAEMReg) and not model.training
    assert model.config == models.CONFIGS["faemreg-small"]
    assert "faemreg-small" in models.available() and "faemreg-paper" in models.available()
    assert len(models.checksum("faemreg-small")) == 16


def test_shipped_small_model_pulls_a_shifted_section_back():
    from emalign.synth import em_texture

    section = em_texture((1, 96, 96), seed=3)[0].astype(np.float32)
    model = models.load("faemreg-small")
    errors, sizes = [], []
    for shift in [(1.5, -2.0), (-2.5, 1.0), (3.0, 3.0)]:
        field = np.broadcast_to(np.array(shift, np.float32)[:, None, None], (2, 96, 96)).copy()
        stack = np.repeat(section[None], 7, 0)
        stack[3] = warp(section, field)  # moving(p) = section(p + shift): the pull back is -shift
        with torch.no_grad():
            pred = model(normalize_sections(torch.from_numpy(stack)[None]))[0, :, 16:-16, 16:-16].mean((1, 2))
        errors.append(float(np.hypot(*(pred.numpy() + np.array(shift)))))
        sizes.append(float(np.hypot(*shift)))
    assert np.mean(errors) < 0.3 * np.mean(sizes)


@pytest.mark.parametrize("name", ["nope", "faemreg-paper", "missing.pt"])
def test_load_unknown_or_untrained_model_raises_one_line_emalign_error(name):
    with pytest.raises(EmalignError) as info:
        models.load(name)
    message = str(info.value)
    assert message and "\n" not in message


@pytest.mark.parametrize("payload", [b"garbage, not a checkpoint", b""], ids=["garbage", "empty"])
def test_load_corrupt_checkpoint_raises_emalign_error(tmp_path, payload):
    path = tmp_path / "broken.pt"
    path.write_bytes(payload)
    with pytest.raises(EmalignError):
        models.load(path)


def test_load_checkpoint_without_weights_raises_emalign_error(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"something": 1}, path)
    with pytest.raises(EmalignError, match="not a valid emalign checkpoint"):
        models.load(path)


def test_save_checkpoint_then_load_round_trips_the_model(tmp_path):
    torch.manual_seed(0)
    model = models.build("faemreg-small")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    model.eval()
    path = tmp_path / "model.pt"
    models.save_checkpoint(path, model, note="test")
    loaded = models.load(path)
    stack = torch.randn(1, 7, 40, 44)
    with torch.no_grad():
        torch.testing.assert_close(loaded(stack), model(stack), atol=0, rtol=0)
    assert torch.load(path, weights_only=False)["note"] == "test"
    assert len(models.checksum(path)) == 16
