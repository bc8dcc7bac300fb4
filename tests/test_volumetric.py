"""Volumetric registration (emalign.volumetric): networks, losses, data recipe, patch-wise inference, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner

from emalign import fields, volumetric
from emalign.cli import main
from emalign.shared_data import FLYEM, SHARED_DATA
from emalign.volumetric import crd, data, infer, losses, sdhnet
from emalign.volumetric.common import VolumeNet, VolumeOutput
from emalign.volumetric.train import VolumeTrainConfig, to_batch, unsupervised_loss

FLYEM_SAMPLE2 = SHARED_DATA / FLYEM[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cells():
    """A procedural EM-like volume (normalised) and its labels: always available."""
    image, labels = data.cells_volume((72, 72, 72), seed=3)
    return data.normalise(image), labels


def _perturb_heads(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give the (near-zero initialised) field heads visible weights, so untrained models move voxels."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d) and module.out_channels == 3:
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)


# --- architectures -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdhnet-paper", "rdn-paper", "crd-paper", "crd-teacher-paper"])
def test_faithful_configurations_have_the_papers_parameter_counts(name):
    count = volumetric.build(name).parameter_count()
    assert abs(count - volumetric.PAPER_PARAMETERS[name]) <= 0.1 * volumetric.PAPER_PARAMETERS[name]


@pytest.mark.parametrize("name", ["sdhnet-small", "rdn-small", "crd-small", "crd-teacher-small"])
def test_small_networks_map_a_pair_to_a_full_resolution_field(name):
    model = volumetric.build(name).eval()
    fixed, moving = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(fixed, moving)
    assert out.field.shape == (2, 3, 32, 32, 32)
    assert all(f.shape == (2, 3, 32, 32, 32) for f in out.increments)
    assert torch.isfinite(out.field).all()
    assert out.field.abs().max() < 1.0  # field heads start small: close to the identity map


def test_sdhnet_final_field_is_the_composition_of_its_increments():
    model = volumetric.build("sdhnet-small").eval()
    _perturb_heads(model, 0.05)
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(fixed, moving)
    total = out.increments[0]
    torch.testing.assert_close(out.intermediates[0], total)
    for step, inter in zip(out.increments[1:], out.intermediates[1:] + [out.field], strict=True):
        total = fields.compose_torch(total, step)
        torch.testing.assert_close(total, inter)
    assert out.field.abs().mean() > 0.01
    assert len(out.intermediates) == model.config.iterations - 1


def test_rdn_runs_every_stage_and_level_with_its_own_estimator():
    model = volumetric.build("rdn-small")
    cfg = model.config
    assert len(model.estimators) == cfg.stages
    assert all(len(stage) == len(cfg.pyramid) for stage in model.estimators)
    assert all(len(level) == cfg.steps for stage in model.estimators for level in stage)
    _perturb_heads(model, 0.05)
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    assert len(out.increments) == cfg.stages
    assert all(f.abs().mean() > 0 for f in out.increments)


def test_sdhnet_affine_stage_starts_at_the_identity_and_moves_with_its_parameters():
    model = sdhnet.SDHNet(sdhnet.SDHNetConfig(**{**sdhnet.SMALL.to_dict(), "affine": True})).eval()
    fixed = torch.rand(1, 1, 32, 32, 32)
    field, penalty = model.affine(fixed, fixed)
    assert field.abs().max() == 0 and float(penalty) == pytest.approx(0, abs=1e-4)
    with torch.no_grad():
        model.affine.head.bias[9:] = torch.tensor([1.0, -2.0, 0.5])  # a pure translation
        field, _ = model.affine(fixed, fixed)
    torch.testing.assert_close(field[0, :, 3, 4, 5], torch.tensor([1.0, -2.0, 0.5]))


def test_crd_teacher_and_student_attention_maps_pair_up_at_the_same_absolute_scales():
    teacher, student = volumetric.build("crd-teacher-small"), volumetric.build("crd-small")
    fixed, moving = torch.rand(1, 1, 64, 64, 64), torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        t, s = teacher(fixed, moving), student(fixed, moving)
    assert t.field.shape == s.field.shape == (1, 3, 64, 64, 64)
    assert [a.shape for a in t.attention] == [a.shape for a in s.attention]
    assert [a.shape[-1] for a in s.attention] == [4, 8, 16, 32]  # 1/16, 1/8, 1/4, 1/2 of the input
    # the student is the shared U-Net run at half resolution: same weights, fewer parameters
    assert student.parameter_count() < teacher.parameter_count()
    assert set(student.state_dict()) <= set(teacher.state_dict())


def test_crd_student_field_is_upsampled_and_doubled():
    student = volumetric.build("crd-small").eval()
    with torch.no_grad():
        student.unet.flow.weight.zero_()
        student.unet.flow.bias.copy_(torch.tensor([1.0, 0.0, -0.5]))  # a constant half-resolution shift
        out = student(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    torch.testing.assert_close(out.field[0, :, 5, 5, 5], torch.tensor([31 / 15, 0.0, -31 / 30]), atol=1e-3, rtol=0)


# --- losses --------------------------------------------------------------------------------------


def test_self_distillation_is_zero_when_the_intermediates_agree_with_the_final_field():
    final = torch.randn(1, 3, 8, 8, 8)
    assert float(sdhnet.self_distillation_loss([final.clone(), final.clone()], final)) < 1e-5


def test_self_distillation_value_and_gradient_terms():
    final = torch.randn(1, 3, 8, 8, 8)
    shifted = final + 0.5  # a constant offset: value RMS 0.5, gradients identical
    assert float(sdhnet.self_distillation_loss([shifted], final)) == pytest.approx(0.5, abs=1e-4)
    ramp = final + 0.1 * torch.arange(8.0).view(1, 1, 8, 1, 1)  # differs in value and in its z-gradient
    value = float((ramp - final).square().mean().sqrt())
    assert float(sdhnet.self_distillation_loss([ramp], final)) == pytest.approx(value + 0.1 / 3, abs=1e-4)
    weights = [0.8, 1.0]  # later intermediates weigh more (gamma 0.8), averaged over T - 1
    both = float(sdhnet.self_distillation_loss([shifted, shifted], final))
    assert both == pytest.approx(0.5 * sum(weights) / 2, abs=1e-4)


def test_self_distillation_does_not_move_the_teacher():
    final = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    student = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    sdhnet.self_distillation_loss([student], final).backward()
    assert final.grad is None and student.grad.abs().sum() > 0


def test_crd_distillation_is_field_mse_plus_attention_mse():
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 4, 4, 4, generator=gen), torch.rand(1, 8, 8, 8, generator=gen)]
    teacher = VolumeOutput(field=torch.rand(1, 3, 8, 8, 8, generator=gen), attention=maps)
    assert float(crd.distillation_loss(teacher, teacher)[0]) == 0
    student = VolumeOutput(field=teacher.field + 0.3, attention=[m + 0.2 for m in maps])
    loss, parts = crd.distillation_loss(student, teacher)
    assert parts["field_mse"] == pytest.approx(0.09, abs=1e-5)
    assert parts["attention_mse"] == pytest.approx(2 * 0.04, abs=1e-5)
    assert float(loss) == pytest.approx(0.17, abs=1e-5)


def test_similarities_are_zero_for_identical_volumes_and_grow_with_misalignment(cells):
    volume = torch.from_numpy(cells[0][:32, :32, :32])[None, None]
    shifted = torch.roll(volume, 2, dims=4)
    for kind in losses.SIMILARITIES:
        assert float(losses.similarity_loss(kind, volume, volume)) < 1e-3
        assert float(losses.similarity_loss(kind, volume, shifted)) > 0.1


def test_dice_uses_the_largest_labels_and_is_one_for_identical_labels():
    labels = np.zeros((10, 10, 10), np.int32)
    labels[:5], labels[5:8], labels[8:] = 1, 2, 3
    assert losses.mean_dice(labels, labels) == 1.0
    assert set(losses.dice_scores(labels, labels, largest=2)) == {1, 2}
    other = labels.copy()
    other[4] = 2  # label 1 loses a slab to label 2
    assert losses.dice_scores(other, labels)[1] == pytest.approx(2 * 400 / 900)


# --- data ----------------------------------------------------------------------------------------


def test_procedural_volume_has_membranes_between_labelled_cells(cells):
    image, labels = cells
    assert image.shape == labels.shape == (72, 72, 72)
    assert labels.min() >= 1 and len(np.unique(labels)) > 20
    boundary = np.zeros(labels.shape, bool)
    boundary[:-1] |= labels[:-1] != labels[1:]
    assert image[boundary].mean() < image[~boundary].mean() - 0.1  # dark membranes


def test_pair_ground_truth_registers_moving_onto_fixed(cells):
    image, labels = cells
    pair = data.make_pair(image, 32, np.random.default_rng(0), labels=labels, noise=0.0)
    inner = (slice(4, -4),) * 3
    aligned = fields.warp(pair.moving, pair.field)
    before = np.abs(pair.fixed - pair.moving)[inner].mean()
    after = np.abs(pair.fixed - aligned)[inner].mean()
    assert after < 0.35 * before
    warped_labels = fields.warp(pair.moving_labels.astype(np.float32), pair.field, order=0)
    assert losses.mean_dice(warped_labels, pair.fixed_labels) > losses.mean_dice(pair.moving_labels, pair.fixed_labels)
    assert fields.folding_percent(pair.field) < 0.1


def test_smooth_3d_field_has_the_requested_amplitude():
    field = data.random_smooth_field_3d((24, 20, 16), 1.5, 8.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.sqrt((field**2).mean(axis=(1, 2, 3))), 1.5, rtol=1e-4)


@pytest.mark.e2e
@pytest.mark.skipif(not FLYEM_SAMPLE2.exists(), reason=f"FlyEM data not found at {FLYEM_SAMPLE2}")
def test_flyem_pairs_by_known_deformation_and_the_shipped_model_registers_them():
    volume = data.normalise(data.flyem_volume(1))
    pair = data.make_pairs(volume, 1, 48, seed=11)[0]
    inner = (slice(4, -4),) * 3
    corr = lambda a, b: np.corrcoef(a[inner].ravel(), b[inner].ravel())[0, 1]  # noqa: E731
    aligned = corr(pair.fixed, fields.warp(pair.moving, pair.field))
    assert aligned > 0.95 and aligned > corr(pair.fixed, pair.moving) + 0.05
    result = infer.register_volumes(pair.fixed, pair.moving, "sdhnet-small", device="cpu")
    error = np.sqrt(((result.field - pair.field) ** 2).sum(0))[inner].mean()
    assert error < 0.6 * np.sqrt((pair.field**2).sum(0))[inner].mean()


# --- training ------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_tiny_training_run_lowers_the_loss(cells):
    torch.manual_seed(0)
    model = volumetric.build("crd-small")
    cfg = VolumeTrainConfig(device="cpu")
    pairs = data.make_pairs(cells[0], 2, 32, seed=4, spec=data.DeformationSpec(shift=1.5, elastic=1.0))
    batch = to_batch(pairs, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        return unsupervised_loss(model(batch["fixed"], batch["moving"]), batch, cfg)[0]

    with torch.no_grad():
        start = float(loss())
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert float(loss()) < start - 0.02


@pytest.mark.e2e
def test_crd_schedule_trains_teacher_then_low_resolution_model_then_distils_the_student(tmp_path):
    args = ["volume", "train", "--out", str(tmp_path), "--model", "crd-small", "--steps", "2", "--distill-steps", "1"]
    args += ["--procedural", "1", "--procedural-size", "64", "--crop", "32", "--batch", "1", "--val-pairs", "1"]
    args += ["--val-every", "1", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    teacher = torch.load(tmp_path / "teacher" / "best.pt", weights_only=False)
    lowres = torch.load(tmp_path / "lowres" / "best.pt", weights_only=False)
    student = torch.load(tmp_path / "last.pt", weights_only=False)
    assert (teacher["kind"], lowres["kind"], student["kind"]) == ("crd-teacher", "crd", "crd")
    assert student["teacher"] == str(tmp_path / "teacher" / "best.pt")
    assert student["teacher_name"] == "crd-teacher-small"
    # the student starts from the low-resolution model: before distilling it scores exactly as that model
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["step"] == [0, 1]
    assert history["val_epe"][0] == pytest.approx(lowres["val_epe"], abs=1e-6)


# --- inference -----------------------------------------------------------------------------------


class _Pointwise(VolumeNet):
    """A fake network whose field at a voxel depends only on the inputs at that voxel."""

    kind, divisor = "pointwise", 8

    def __init__(self) -> None:
        super().__init__(volumetric.crd.SMALL)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> VolumeOutput:
        return VolumeOutput(field=torch.cat([fixed, moving, fixed - moving], 1) * 3.0)


def test_patch_blending_is_a_partition_of_unity_and_indexes_patches_exactly(cells):
    fixed, moving = cells[0][:70, :60, :50], cells[0][2:72, 5:65, 1:51]
    whole = infer.predict_field(_Pointwise(), fixed, moving, patch=200, device="cpu")
    patched = infer.predict_field(_Pointwise(), fixed, moving, patch=24, overlap=8, device="cpu")
    np.testing.assert_allclose(patched, whole, atol=1e-5)
    assert len(list(infer.tiles(fixed.shape, (24, 24, 24), 8))) > 20


def test_patch_wise_inference_has_no_seams(cells):
    image = cells[0]
    pair = data.make_pair(image, 64, np.random.default_rng(7), noise=0.0, margin=4)
    model = volumetric.load("rdn-small")
    whole = infer.predict_field(model, pair.fixed, pair.moving, patch=64, device="cpu")
    patched = infer.predict_field(model, pair.fixed, pair.moving, patch=32, overlap=16, device="cpu")
    assert np.abs(patched - whole).mean() < 0.25 * np.abs(whole).mean()
    # where patches start and end (every 16 voxels along z) the field jumps no more than elsewhere
    jumps = np.abs(np.diff(patched, axis=1))
    seams = [15, 31, 47]
    assert jumps[:, seams].mean() < 1.5 * jumps.mean()
    assert jumps[:, seams].max() < 1.25 * np.delete(jumps, seams, axis=1).max()


def test_chunked_warp_matches_the_whole_volume_warp_and_reads_lazily(cells):
    import dask.array as da

    moving = cells[0][:40, :36, :30]
    field = data.random_smooth_field_3d(moving.shape, 3.0, 8.0, np.random.default_rng(1))
    expected = fields.warp(moving, field)
    lazy = da.from_array(moving, chunks=(8, 36, 30))
    np.testing.assert_allclose(infer.warp_volume(lazy, field, chunk=16), expected, atol=1e-5)
    labels = cells[1][:40, :36, :30]
    np.testing.assert_array_equal(
        infer.warp_volume(labels, field, order=0, chunk=16), fields.warp(labels.astype(np.float32), field, order=0)
    )


def test_affine_prealignment_composes_like_fields_compose():
    matrix = np.array([[1.02, 0.01, 0.0, 1.5], [0.0, 0.99, 0.02, -2.0], [0.01, 0.0, 1.0, 0.5]])
    pre = infer.AffinePrealignment(matrix)
    box = (slice(0, 12), slice(0, 10), slice(0, 8))
    u = data.random_smooth_field_3d((12, 10, 8), 1.0, 6.0, np.random.default_rng(2))
    expected = fields.compose(pre.field(box), u)
    inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))  # compose clamps the affine field outside
    np.testing.assert_allclose(pre.compose_after(u, box)[inner], expected[inner], atol=1e-4)


def test_affine_baseline_recovers_an_affine_deformation(cells):
    spec = data.DeformationSpec(shift=2.0, rotation=2.0, scale=0.02, elastic=0.0, jitter=0.0)
    pair = data.make_pairs(cells[0], 1, 40, seed=2, spec=spec, noise=0.0)[0]
    from emalign.volumetric.affine import affine_register

    _, field = affine_register(pair.fixed, pair.moving)
    error = np.sqrt(((field - pair.field) ** 2).sum(0)).mean()
    assert error < 0.2 * np.sqrt((pair.field**2).sum(0)).mean()


def test_3d_sample_reads_trilinear_values():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # linear in each axis
    coords = np.array([1.5, 2.25, 3.0], np.float32).reshape(3, 1, 1, 1)
    value = fields.sample(volume, coords)[0, 0, 0]
    assert value == pytest.approx(1.5 * 30 + 2.25 * 6 + 3.0)


# --- CLI -----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_cli_register_round_trip(tmp_path, cells):
    image, labels = cells
    pair = data.make_pair(image, 64, np.random.default_rng(5), labels=labels, noise=0.0, margin=4)
    to_uint8 = lambda x: np.clip(np.round(x * 40 + 128), 0, 255).astype(np.uint8)  # noqa: E731 (standardised in)
    tifffile.imwrite(tmp_path / "fixed.tif", to_uint8(pair.fixed))
    tifffile.imwrite(tmp_path / "moving.tif", to_uint8(pair.moving))
    tifffile.imwrite(tmp_path / "fixed_labels.tif", pair.fixed_labels)
    tifffile.imwrite(tmp_path / "moving_labels.tif", pair.moving_labels)
    out, field_path = tmp_path / "out.zarr", tmp_path / "field.zarr"
    args = ["volume", "register", "--fixed", str(tmp_path / "fixed.tif"), "--moving", str(tmp_path / "moving.tif")]
    args += ["--out", str(out), "--field", str(field_path), "--model", "crd-small", "--device", "cpu", "--quiet"]
    args += ["--moving-labels", str(tmp_path / "moving_labels.tif")]
    args += ["--fixed-labels", str(tmp_path / "fixed_labels.tif"), "--patch", "64"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Dice" in result.output
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "z"
    assert group.attrs["emalign"]["model"]["name"] == "crd-small" and group.attrs["emalign"]["complete"]
    warped = np.asarray(group["0"])
    field = np.asarray(zarr.open_array(str(field_path), mode="r"))
    assert warped.dtype == np.uint8 and warped.shape == field.shape[1:] == (64, 64, 64)
    expected = infer.register_volumes(
        tifffile.imread(tmp_path / "fixed.tif"),
        tifffile.imread(tmp_path / "moving.tif"),
        "crd-small",
        patch=64,
        device="cpu",
    )
    np.testing.assert_allclose(field, expected.field, atol=1e-4)
    np.testing.assert_allclose(warped, np.clip(np.rint(expected.warped), 0, 255), atol=1)
    assert np.asarray(group["labels"]).shape == (64, 64, 64)
    dice = [float(s) for s in result.output.split("Dice ")[1].split()[0::2][:2]]
    assert dice[1] > dice[0]


def test_cli_register_reports_bad_input_in_one_line(tmp_path):
    result = CliRunner().invoke(
        main, ["volume", "register", "--fixed", str(tmp_path / "nope.tif"), "--moving", "x.tif", "--out", "o.zarr"]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
