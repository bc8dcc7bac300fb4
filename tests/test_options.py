"""The options of ``emalign align`` and of every stage are made from the AlignParams fields (one definition each)."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest

from emalign.cli import _params, main
from emalign.errors import EmalignError
from emalign.pipeline import AlignParams
from emalign.pipeline.stages import STAGES


def options(command: str) -> dict[str, click.Option]:
    return {param.name: param for param in main.commands[command].params if isinstance(param, click.Option)}


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
