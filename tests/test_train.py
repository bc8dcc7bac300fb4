"""Self-supervised training of the serial networks (emalign/train.py)."""

import json
import time

import numpy as np
import pytest
import torch

from emalign.consensus import PAPER_REFERENCE_WEIGHTS, reference_weights
from emalign.errors import EmalignError
from emalign.fields import warp_torch
from emalign.synth import em_texture
from emalign.train import TrainConfig, WindowSampler, random_rigid, smooth_noise, steps_that_fit, train

torch.set_num_threads(1)

TRAIN_STEPS = 100  # measured: ~15 s on a busy 2-core CPU; val EPE ~2.3 px against ~3.5 px with no correction


@pytest.fixture(scope="module")
def volume():
    return em_texture((24, 200, 200), seed=0)


@pytest.fixture
def no_intensity_augmentation(monkeypatch):
    monkeypatch.setattr(WindowSampler, "_augment_intensity", lambda self, raw: raw)


# --- reference weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("references", [1, 2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_weights_sum_to_one_with_nothing_on_the_moving_slot(references, symmetric):
    weights = reference_weights(references, symmetric)
    assert weights.shape == (2 * references + 1,)
    assert abs(weights.sum() - 1.0) < 1e-12
    assert weights[references] == 0.0


def test_reference_weights_favour_the_nearest_reference():
    weights = reference_weights(3, symmetric=False)
    assert weights[2] > weights[1] > weights[0] > 0
    np.testing.assert_allclose(weights[:3][::-1], np.array(PAPER_REFERENCE_WEIGHTS) / sum(PAPER_REFERENCE_WEIGHTS))


def test_sequential_reference_weights_count_each_reference_once():
    weights = reference_weights(3, symmetric=False)
    np.testing.assert_array_equal(weights[4:], 0.0)


def test_symmetric_reference_weights_split_each_distance_over_both_sides():
    symmetric, sequential = reference_weights(3, True), reference_weights(3, False)
    np.testing.assert_allclose(symmetric, symmetric[::-1])
    for d in (1, 2, 3):
        assert symmetric[3 - d] + symmetric[3 + d] == pytest.approx(sequential[3 - d])


# --- random fields -----------------------------------------------------------------------------------------


def test_smooth_noise_has_the_requested_rms_and_zero_mean():
    gen = torch.Generator().manual_seed(0)
    amplitude = torch.tensor([0.5, 2.0, 3.0])
    noise = smooth_noise(3, 40, amplitude, torch.tensor([10.0, 20.0, 80.0]), gen)
    assert noise.shape == (3, 2, 40, 40)
    torch.testing.assert_close(noise.square().mean((2, 3)).sqrt(), amplitude[:, None].expand(3, 2), rtol=1e-4, atol=0)
    torch.testing.assert_close(noise.mean((2, 3)), torch.zeros(3, 2), atol=1e-5, rtol=0)


def test_random_rigid_without_motion_is_zero():
    out = random_rigid(2, 16, 0.0, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 16, 16)
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)


# --- the window sampler ------------------------------------------------------------------------------------


def test_window_sampler_returns_normalised_stacks_targets_and_masks(volume):
    sampler = WindowSampler([volume], 3, TrainConfig(crop=64), seed=0)
    stack, target, mask = sampler.sample(3)
    assert stack.shape == (3, 7, 64, 64) and stack.dtype == torch.float32
    assert target.shape == (3, 2, 64, 64) and target.dtype == torch.float32
    assert mask.shape == (3, 64, 64) and mask.dtype == torch.bool
    assert mask.float().mean() > 0.5
    for section in stack.reshape(-1, 64, 64):
        valid = section[section != 0]
        if valid.numel():
            assert abs(float(valid.mean())) < 1e-3 and abs(float(valid.std(unbiased=False)) - 1.0) < 1e-2
    assert target.abs().mean() > 0.5  # the moving section really is misaligned


def test_warping_the_moving_slot_by_the_target_matches_its_references(volume, no_intensity_augmentation):
    config = TrainConfig(crop=96, reference_jitter=0.0, blank_reference=0.0)
    stack, target, mask = WindowSampler([volume], 3, config, seed=0).sample(4, same_section=1.0)
    warped = warp_torch(stack[:, 3:4], target)[:, 0]
    weight = mask.float()

    def error(image: torch.Tensor) -> float:
        return float(((image - stack[:, 2]).square() * weight).sum() / weight.sum())

    assert error(warped) < 0.1 * error(stack[:, 3])


def test_mirrored_windows_show_the_same_section_in_twin_slots(volume, no_intensity_augmentation):
    config = TrainConfig(crop=64, symmetric_fraction=0.0, blank_reference=0.0)
    stack, _, _ = WindowSampler([volume], 3, config, seed=1).sample(3)
    torch.testing.assert_close(stack[:, 4:], stack[:, :3].flip(1))


def test_blank_references_are_all_zero_slots(volume):
    config = TrainConfig(crop=64, blank_reference=1.0, symmetric_fraction=1.0)
    stack, _, _ = WindowSampler([volume], 3, config, seed=2).sample(4)
    blank = (stack == 0).flatten(2).all(2)  # (B, D)
    assert (blank.sum(1) == 1).all() and not blank[:, 3].any()


def test_window_sampler_rejects_missing_or_small_volumes():
    with pytest.raises(EmalignError, match="no training data"):
        WindowSampler([], 3, TrainConfig(), seed=0)
    with pytest.raises(EmalignError, match="smaller than"):
        WindowSampler([np.zeros((10, 100, 100), np.uint8)], 3, TrainConfig(crop=96), seed=0)


# --- training ----------------------------------------------------------------------------------------------


def _config(steps: int) -> TrainConfig:
    return TrainConfig(
        model="faemreg-small",
        data=(),
        procedural=1,
        procedural_shape=(24, 200, 200),
        crop=64,
        batch=4,
        z_steps=(1,),
        val_z_step=1,  # validated on the z-step it trains on
        lr=1e-3,  # the from-scratch rate of the model card's stage 1; at 2e-3 a 100-step start is a coin toss
        steps=steps,
        val_every=TRAIN_STEPS,
        val_windows=8,
        device="cpu",
        seed=0,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    started = time.perf_counter()
    history = train(_config(TRAIN_STEPS), out, resume=False, progress=False)
    return out, history, time.perf_counter() - started


@pytest.mark.e2e
def test_training_from_scratch_beats_no_correction(trained):
    _, history, seconds = trained
    assert history["steps"] == [TRAIN_STEPS]
    assert history["val_epe"][-1] < 0.9 * history["val_epe_identity"][-1], history


@pytest.mark.e2e
def test_training_writes_checkpoints_and_history(trained):
    from emalign import models

    out, history, _ = trained
    assert {"best.pt", "last.pt", "history.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "history.json").read_text()) == history
    last = torch.load(out / "last.pt", weights_only=False)
    assert last["step"] == TRAIN_STEPS and "optimizer" in last and last["train"]["steps"] == TRAIN_STEPS
    best = models.load(out / "best.pt")
    assert best.config.name == "faemreg-small"


@pytest.mark.e2e
def test_training_resumes_from_last_checkpoint(trained):
    out, _, _ = trained
    history = train(_config(TRAIN_STEPS + 4), out, resume=True, progress=False)
    assert history["steps"] == [TRAIN_STEPS, TRAIN_STEPS + 4]
    assert torch.load(out / "last.pt", weights_only=False)["step"] == TRAIN_STEPS + 4


def test_the_steps_that_fit_fill_the_remaining_budget_at_the_measured_rate():
    assert steps_that_fit(20, 10.0, 100.0) == int(0.9 * 100 * 2)
    assert steps_that_fit(20, 10.0, -5.0) == 1  # a spent budget still takes the one step that validates


@pytest.mark.e2e
def test_a_time_boxed_run_fits_its_step_count_to_its_minutes_and_keeps_it_on_resume(tmp_path):
    from dataclasses import replace

    cfg = replace(_config(10**6), minutes=0.1, val_every=10**6)
    history = train(cfg, tmp_path, resume=False, progress=False)
    steps = torch.load(tmp_path / "last.pt", weights_only=False)["train"]["steps"]
    assert 20 < steps < 10**6 and history["steps"] == [steps]
    assert train(cfg, tmp_path, resume=True, progress=False)["steps"] == [steps]


def test_train_refuses_a_file_as_output(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(EmalignError, match="not a directory"):
        train(_config(1), path, progress=False)


# --- distillation ------------------------------------------------------------------------------------------


def test_warm_start_copies_the_teachers_weights_where_names_and_shapes_agree():
    from emalign import models
    from emalign.train import warm_start

    teacher, student = models.load("faemreg-small"), models.build("faemreg-fast")
    copied = warm_start(student, teacher)
    mine, theirs = student.state_dict(), teacher.state_dict()
    differing = [key for key in mine if key not in theirs or mine[key].shape != theirs[key].shape]
    assert differing and copied == len(mine) - len(differing)  # the finest head: no cost volume there
    assert all(torch.equal(mine[key], theirs[key]) for key in mine if key not in differing)


def _distance_to_teacher(student, teacher, batch) -> float:
    from emalign.models.losses import endpoint_error

    stack, _, mask = batch
    with torch.no_grad():
        return float(endpoint_error(student.eval()(stack), teacher(stack), mask))


@pytest.mark.e2e
def test_distillation_pulls_the_students_fields_towards_the_teachers(tmp_path, volume):
    from dataclasses import replace

    from emalign import models
    from emalign.train import warm_start

    cfg = replace(
        _config(120), model="faemreg-fast", teacher="faemreg-small", supervised_weight=0.0, val_every=120, lr=2e-4
    )
    teacher = models.load("faemreg-small")
    batch = WindowSampler([volume], 3, cfg, seed=7).sample(8, z_step=1)
    torch.manual_seed(0)  # the layers the warm start does not fill
    start = models.build("faemreg-fast")
    warm_start(start, teacher)
    train(cfg, tmp_path, resume=False, progress=False)
    before = _distance_to_teacher(start, teacher, batch)
    after = _distance_to_teacher(models.load(tmp_path / "last.pt"), teacher, batch)
    assert after < 0.85 * before, (before, after)
