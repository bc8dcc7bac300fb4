"""The stage table (emalign.pipeline.stages) is what the commands, the runner and the output's markers follow."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from click.testing import CliRunner
from helpers import write_stack

import emalign.cli
from emalign.io import open_stack
from emalign.pipeline import AlignParams, Workspace, run_stage, stages
from emalign.pipeline.stages import TABLE, Stage, requirements

SHAPE = (8, 64, 64)
OPTIONS = ["--block", "4", "--adapt", "1", "--quiet"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return write_stack(tmp_path_factory.mktemp("input"), SHAPE, seed=3)


@pytest.fixture
def reloaded_cli():
    """``emalign.cli`` imported again after the test changed the table, and once more after it is restored."""
    yield lambda: importlib.reload(emalign.cli)
    importlib.reload(emalign.cli)


def test_every_stage_of_the_table_is_a_command_with_its_summary_as_help():
    for spec in TABLE:
        command = emalign.cli.main.commands[spec.name]
        assert command.help == spec.summary
        assert "--z-range" in [opt for param in command.params for opt in param.opts]


def test_a_stage_added_to_the_table_becomes_a_command(monkeypatch, reloaded_cli):
    monkeypatch.setattr(stages, "TABLE", (*TABLE, Stage("extra", "Stage 8: an extra step.", markers="")))
    main = reloaded_cli().main
    assert main.commands["extra"].help == "Stage 8: an extra step."
    assert "extra" in CliRunner().invoke(main, ["--help"]).output


def test_a_switched_off_stage_is_not_required():
    assert requirements("estimate", AlignParams()) == ("prealign",)
    assert requirements("estimate", AlignParams(adapt=3)) == ("prealign", "adapt")
    assert requirements("qc", AlignParams()) == ()


@pytest.mark.parametrize("name", [spec.name for spec in TABLE if spec.requires])
def test_a_stage_run_before_what_the_table_says_it_requires_names_that_stage(stack, tmp_path, name):
    first = requirements(name, AlignParams(adapt=1))[0]
    result = CliRunner().invoke(emalign.cli.main, [name, str(stack), str(tmp_path / "out.zarr"), *OPTIONS])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'out.zarr'}: stage {first!r} has ")
    assert line.endswith(f"run `emalign {first}` first")


def test_the_runner_checks_the_requirements_the_table_gives(stack, tmp_path, monkeypatch):
    ws = Workspace.create(open_stack(stack), tmp_path / "out.zarr", AlignParams(block=4))
    qc = stages.stage("qc")
    patched = tuple(dataclasses.replace(qc, requires=("prealign",)) if spec is qc else spec for spec in TABLE)
    monkeypatch.setattr(stages, "TABLE", patched)
    with pytest.raises(emalign.EmalignError, match="stage 'prealign' has 2 unfinished block"):
        run_stage("qc", ws, progress=False)


def test_the_output_has_one_marker_array_per_marked_stage_of_the_size_the_table_gives(stack, tmp_path):
    ws = Workspace.create(open_stack(stack), tmp_path / "out.zarr", AlignParams(block=4, task_tile=32))
    blocks, tiles = len(ws.plan.blocks()), len(ws.plan.tiles())
    assert (blocks, tiles) == (2, 4)
    sizes = {spec.name: len(ws.stage_done(spec.name)) for spec in stages.MARKED}
    assert sizes == {"prealign": 2, "adapt": 1, "estimate": 8, "stitch": 4, "refine": 3, "polish": 3}
