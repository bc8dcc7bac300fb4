"""The one builder of the ``emalign`` options made from dataclass fields (:func:`emalign.options.param`), and the
reader that turns those options back into the dataclass. Used by :mod:`emalign.cli` (``align``, the stages,
``train``) and :mod:`emalign.cli_volume` (``volume train``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import Field
from pathlib import Path
from typing import get_args, get_type_hints

import click

from emalign import stores
from emalign.errors import EmalignError
from emalign.options import option_fields


def flag(spec: Field) -> str:
    """The option of a field: ``--field-name`` unless its metadata names one."""
    return spec.metadata.get("flag", f"--{spec.name.replace('_', '-')}")


def field_options(func, specs: Iterable[Field]):
    """The options of the dataclass fields ``specs`` (see :func:`emalign.options.param`), made from the fields
    (default, type) and their metadata (help, flag, choices, multiple, type); a tuple's default is shown
    comma-separated."""
    for spec in reversed(list(specs)):
        meta = spec.metadata
        if meta.get("multiple"):
            func = click.option(flag(spec), spec.name, multiple=True, help=meta["help"])(func)
            continue
        default = ",".join(map(str, spec.default)) if isinstance(spec.default, tuple) else spec.default
        option = click.option(
            flag(spec),
            spec.name,
            default=default,
            show_default=default not in ("", None),
            type=click.Choice(meta["choices"]) if "choices" in meta else meta.get("type"),
            help=meta["help"],
        )
        func = option(func)
    return func


def config_from_options(config: type, opts: dict):
    """The dataclass ``config`` of the options made from its fields (the fields that are no option at their
    defaults)."""
    return config(**{name: field_value(config, spec, opts[name]) for name, spec in option_fields(config).items()})


def field_value(config: type, spec: Field, text: object) -> object:
    """A field of ``config`` from its option: comma-separated numbers for a tuple, a resolved path for a path."""
    meta = spec.metadata
    if meta.get("path"):
        return local_path(str(text))
    if meta.get("multiple"):
        return tuple(text)
    if not isinstance(spec.default, tuple):
        return text
    if not text:
        return ()
    name = flag(spec)
    number = get_args(get_type_hints(config)[spec.name])[0]
    try:
        values = tuple(number(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise EmalignError(f"{name} {text!r}: expected {meta['expect']}") from None
    if "length" in meta and len(values) != meta["length"]:
        raise EmalignError(f"{name} {text!r}: expected {meta['expect']}")
    return values


def local_path(path: str) -> str:
    """What the parameters record of a path option (``--mask``): the URL as given, or the resolved local path ('' for
    none)."""
    if not path or stores.is_url(path):
        return path
    return str(Path(stores.local(path)).resolve())
