"""The options of ``emalign align`` and of every stage are made from the AlignParams fields, those of ``emalign train``
from the TrainConfig fields, those of ``emalign volume train`` from the VolumeTrainConfig fields (one definition each:
emalign/options.py, one builder: emalign/cli_options.py)."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest
from helpers import invoke, ok

from emalign.cli import _params, main
from emalign.errors import EmalignError
from emalign.options import option_fields
from emalign.pipeline import AlignParams
from emalign.pipeline.stages import STAGES
from emalign.train_config import TrainConfig
from emalign.volume_train_config import VolumeTrainConfig


def options(command: str, group: click.Group = main) -> dict[str, click.Option]:
    return {param.name: param for param in group.commands[command].params if isinstance(param, click.Option)}


@pytest.mark.parametrize("command", ["align", *STAGES])
def test_every_field_is_an_option_with_the_fields_default_and_help(command):
    made = options(command)
    for spec in fields(AlignParams):
        option = made[spec.name]
        assert option.help == spec.metadata["help"]
        assert option.default == ("" if spec.default in ("", ()) else spec.default)
        assert option.show_default == (spec.default not in ("", ()))
        if "choices" in spec.metadata:
            assert tuple(option.type.choices) == tuple(spec.metadata["choices"])


def test_the_options_at_their_defaults_give_the_default_params():
    defaults = {name: option.default for name, option in options("align").items()}
    assert _params(defaults) == AlignParams()


def test_tuple_fields_are_read_as_comma_separated_numbers():
    defaults = {name: option.default for name, option in options("align").items()}
    params = _params({**defaults, "skip": "12, 40", "voxel_size": "40,4,4"})
    assert params.skip == (12, 40) and params.voxel_size == (40.0, 4.0, 4.0)
    with pytest.raises(EmalignError, match=r"--skip 'one': expected comma-separated section numbers"):
        _params({**defaults, "skip": "one"})
    with pytest.raises(EmalignError, match=r"--voxel-size '40,4': expected three numbers z,y,x"):
        _params({**defaults, "voxel_size": "40,4"})


# --- emalign train -------------------------------------------------------------------------------------------


def test_every_train_config_field_that_is_an_option_has_the_fields_default_and_help():
    made = options("train")
    for name, spec in option_fields(TrainConfig).items():
        option = made[name]
        assert option.help == spec.metadata["help"]
        if spec.metadata.get("multiple"):
            assert option.multiple and spec.default == ()
        elif isinstance(spec.default, tuple):
            assert option.default == ",".join(map(str, spec.default))
        else:
            assert option.default == spec.default and option.show_default == (spec.default != "")


def test_the_train_command_has_no_option_but_the_config_fields_and_where_to_write():
    assert set(options("train")) == {*option_fields(TrainConfig), "out_dir", "no_resume"}


def recorded_configs(monkeypatch, training: str) -> list:
    """The configs that a command hands to the training function ``training`` (replaced: nothing is trained)."""
    given = []

    def record(cfg, out, **run):
        given.append(cfg)
        return {"val_epe": [1.0], "val_epe_identity": [1.0]}

    monkeypatch.setattr(training, record)
    return given


@pytest.fixture
def trained_with(monkeypatch) -> list[TrainConfig]:
    """The :class:`TrainConfig` that ``emalign train`` handed to the training."""
    return recorded_configs(monkeypatch, "emalign.train.train")


def test_the_train_command_at_its_defaults_trains_the_default_config(trained_with, tmp_path):
    ok("train", "--out", tmp_path)
    assert trained_with == [TrainConfig()]


def test_the_train_command_reads_repeatable_stacks_and_comma_separated_z_steps(trained_with, tmp_path):
    args = ["--data", "a.tif", "--data", "b.zarr", "--z-steps", "1, 4", "--lr", "5e-4", "--teacher", "faemreg-small"]
    ok("train", "--out", tmp_path, *args)
    expected = TrainConfig(data=("a.tif", "b.zarr"), z_steps=(1, 4), lr=5e-4, teacher="faemreg-small")
    assert trained_with == [expected]


def test_z_steps_that_are_not_numbers_are_a_one_line_error(trained_with, tmp_path):
    result = invoke("train", "--out", tmp_path, "--z-steps", "1,two")
    assert result.exit_code == 2 and not trained_with
    assert result.stderr.strip() == "error: --z-steps '1,two': expected comma-separated section spacings, e.g. 1,2,4"


@pytest.mark.parametrize("name", ["faemreg-small", "faemreg-fast"])
def test_the_shipped_checkpoints_training_settings_load_into_the_config(name):
    import torch

    from emalign.models import WEIGHTS_DIR

    record = torch.load(WEIGHTS_DIR / f"{name}.pt", map_location="cpu", weights_only=False)["train"]
    loaded = TrainConfig(**record).to_dict()
    assert {key: loaded[key] for key in record} == record  # options added since keep their defaults


# --- emalign volume train ------------------------------------------------------------------------------------


def test_every_volume_train_config_field_is_an_option_with_the_fields_default_and_help():
    made = options("train", main.commands["volume"])
    assert set(made) == {*(spec.name for spec in fields(VolumeTrainConfig)), "out_dir", "threads", "quiet"}
    for name, spec in option_fields(VolumeTrainConfig).items():
        option = made[name]
        assert option.help == spec.metadata["help"]
        if spec.metadata.get("multiple"):
            assert option.multiple and spec.default == ()
        else:
            assert option.default == spec.default and option.show_default == (spec.default is not None)
    assert tuple(made["similarity"].type.choices) == ("lncc", "pearson")
    assert made["distill_steps"].type is click.INT and made["lr"].type is click.FLOAT


@pytest.fixture
def volume_trained_with(monkeypatch) -> list[VolumeTrainConfig]:
    """The :class:`VolumeTrainConfig` that ``emalign volume train`` handed to the training."""
    return recorded_configs(monkeypatch, "emalign.volumetric.train.train")


def test_the_volume_train_command_at_its_defaults_trains_the_default_config(volume_trained_with, tmp_path):
    ok("volume", "train", "--out", tmp_path)
    assert volume_trained_with == [VolumeTrainConfig()]


def test_the_volume_train_command_reads_repeatable_volumes_and_optional_crd_settings(volume_trained_with, tmp_path):
    args = ["--data", "a.tif", "--data", "b.zarr", "--labels", "a_labels.tif", "--labels", "b_labels.zarr"]
    args += ["--val-data", "c.tif", "--distill-steps", "40", "--teacher", "t.pt", "--similarity", "pearson"]
    ok("volume", "train", "--out", tmp_path, *args, "--lr", "3e-4")
    expected = VolumeTrainConfig(
        data=("a.tif", "b.zarr"),
        labels=("a_labels.tif", "b_labels.zarr"),
        val_data=("c.tif",),
        distill_steps=40,
        teacher="t.pt",
        similarity="pearson",
        lr=3e-4,
    )
    assert volume_trained_with == [expected]


def test_a_volume_train_option_of_the_wrong_type_is_refused_before_training(volume_trained_with, tmp_path):
    for bad in (["--distill-steps", "many"], ["--similarity", "mse"]):
        assert invoke("volume", "train", "--out", tmp_path, *bad).exit_code == 2
    assert not volume_trained_with


@pytest.mark.parametrize("name", ["sdhnet-small", "rdn-small", "crd-small", "crd-teacher-small"])
def test_the_shipped_volumetric_checkpoints_training_settings_load_into_the_config(name):
    import torch

    from emalign.volumetric import WEIGHTS_DIR

    record = torch.load(WEIGHTS_DIR / f"{name}.pt", map_location="cpu", weights_only=False)["train"]
    assert VolumeTrainConfig(**record).to_dict() == record
