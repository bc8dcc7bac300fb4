"""Finding and reading network checkpoints, shared by the serial models and the volumetric ones."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn

from emalign.errors import EmalignError


def find_checkpoint(
    name_or_path: str | Path, weights_dir: Path, configs: Collection[str], train_command: str, shipped: list[str]
) -> Path:
    """The file behind a shipped model name (``weights_dir/NAME.pt``) or a ``.pt`` path.

    ``configs``: architecture names (untrained: the error says how to train them with
    ``train_command``); ``shipped``: the names to list when the name is unknown.
    """
    path = Path(name_or_path)
    if path.suffix == ".pt" and path.exists():
        return path
    candidate = weights_dir / f"{name_or_path}.pt"
    if candidate.exists():
        return candidate
    if str(name_or_path) in configs:
        raise EmalignError(
            f"no trained weights ship for {name_or_path!r}; train them with `{train_command} --model {name_or_path}`"
        )
    if path.suffix == ".pt":
        raise EmalignError(f"{path}: checkpoint file not found")
    raise EmalignError(f"unknown model {str(name_or_path)!r}; shipped: {', '.join(shipped)} or a .pt checkpoint")


def read_checkpoint(path: Path, build: Callable[[dict], nn.Module], what: str) -> nn.Module:
    """The network in checkpoint file ``path``: ``build(checkpoint)`` with the stored weights loaded, on the CPU.

    Anything that is not such a checkpoint is a one-line ``EmalignError`` naming the file and ``what``.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        model = build(checkpoint)
        model.load_state_dict(checkpoint["state"])
    except (KeyError, RuntimeError, TypeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise EmalignError(f"{path}: not a valid {what} checkpoint ({type(err).__name__})") from None
    return model


def file_checksum(path: Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint file, for provenance."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
