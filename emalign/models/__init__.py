"""Serial registration models: build by name, load trained weights by name or path."""

from __future__ import annotations

from pathlib import Path

import torch

from emalign.checkpoints import file_checksum, find_checkpoint, read_checkpoint
from emalign.errors import EmalignError
from emalign.models.faemreg import CONFIGS, FAEMReg, FAEMRegConfig
from emalign.options import DEFAULT_MODEL

WEIGHTS_DIR = Path(__file__).parent / "weights"


def available() -> list[str]:
    """Names of the architectures (``build``) and of the shipped checkpoints (``load``)."""
    shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))
    return sorted(set(CONFIGS) | set(shipped))


def build(name: str) -> FAEMReg:
    """An untrained network of a named configuration."""
    if name not in CONFIGS:
        raise EmalignError(f"unknown model {name!r}; known: {', '.join(sorted(CONFIGS))}")
    return FAEMReg(CONFIGS[name])


def save_checkpoint(path: str | Path, model: FAEMReg, **extra) -> None:
    """Write a checkpoint holding the architecture and the weights (plus ``extra`` metadata)."""
    torch.save({"config": model.config.to_dict(), "state": model.state_dict(), **extra}, path)


def checkpoint_path(name_or_path: str | Path) -> Path:
    """The file behind a shipped model name or a checkpoint path."""
    return find_checkpoint(name_or_path, WEIGHTS_DIR, CONFIGS, "emalign train", available())


def load(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu") -> FAEMReg:
    """A trained network from a shipped name (``"faemreg-small"``) or a checkpoint path, in eval mode."""

    def build(checkpoint: dict) -> FAEMReg:
        return FAEMReg(FAEMRegConfig.from_dict(checkpoint["config"]))

    return read_checkpoint(checkpoint_path(name_or_path), build, "emalign").to(device).eval()


def checksum(name_or_path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint file, for provenance."""
    return file_checksum(checkpoint_path(name_or_path))


__all__ = ["CONFIGS", "DEFAULT_MODEL", "FAEMReg", "FAEMRegConfig", "available", "build", "checksum", "load"]
