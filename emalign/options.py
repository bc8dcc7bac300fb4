"""Parameters that are also command-line options: one definition each, a dataclass field.

:func:`param` makes a field that carries its option in its metadata; ``emalign`` (:mod:`emalign.cli`) makes the
options of ``align``, of every stage (:class:`emalign.pipeline.AlignParams`), of ``train``
(:class:`emalign.train_config.TrainConfig`) and of ``volume train``
(:class:`emalign.volume_train_config.VolumeTrainConfig`) from those fields (:func:`emalign.cli_options.field_options`),
so an option's default is the field's. Torch-free, so that ``emalign --help`` stays fast.
"""

from __future__ import annotations

from dataclasses import Field, field, fields

DEFAULT_MODEL = "faemreg-small"
"""The shipped serial model the commands, the in-memory API and training use unless told otherwise."""

DEFAULT_VOLUME_MODEL = "sdhnet-small"
"""The shipped volumetric model ``emalign volume`` and :mod:`emalign.volumetric` use unless told otherwise."""


def param(default: object, help: str, **cli: object) -> object:
    """A dataclass field with what the ``emalign`` commands make its option from, in its metadata: ``help`` (the
    option's help line) and, where it applies, ``flag`` (other than ``--field-name``), ``choices``, ``multiple`` (a
    repeatable option, for a tuple of strings), ``type`` (the option's type where the default, None, does not say
    it), ``expect``/``length`` (a tuple given as comma-separated numbers: what the error says is expected, and how
    many), ``path`` (a path or URL, recorded resolved) and ``layout`` (the
    output layout, which ``emalign import`` takes too). A field made by :func:`dataclasses.field` is no option."""
    return field(default=default, metadata={"help": help, **cli})


def option_fields(config: type) -> dict[str, Field]:
    """``{name: field}`` of the fields of the dataclass ``config`` that are options (made by :func:`param`)."""
    return {spec.name: spec for spec in fields(config) if "help" in spec.metadata}
