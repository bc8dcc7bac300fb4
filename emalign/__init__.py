"""emalign: serial-section EM alignment with 3D-convolutional registration networks.

Conventions: arrays ``z, y, x``; 2D fields ``(2, Y, X)`` with channels ``(dy, dx)`` in
full-resolution pixels, pull convention ``aligned(p) = raw(p + u(p))`` (see
:mod:`emalign.fields`).

The in-memory API (:func:`register_sections`) is imported on first use, so that
``import emalign`` (and ``emalign --help``) does not load torch, dask and zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emalign.errors import EmalignError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from emalign.register import Registration, register_sections

_LAZY = {"Registration": "emalign.register", "register_sections": "emalign.register"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emalign' has no attribute {name!r}")


__all__ = ["EmalignError", "Registration", "__version__", "register_sections"]
