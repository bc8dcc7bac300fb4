"""Serial registration models: build by name, load trained weights by name or path."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from emalign.errors import EmalignError
from emalign.models.faemreg import CONFIGS, FAEMReg, FAEMRegConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "faemreg-small"


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
    path = Path(name_or_path)
    if path.suffix == ".pt" and path.exists():
        return path
    shipped = WEIGHTS_DIR / f"{name_or_path}.pt"
    if shipped.exists():
        return shipped
    if str(name_or_path) in CONFIGS:
        raise EmalignError(
            f"no trained weights ship for {name_or_path!r}; train them with `emalign train --model {name_or_path}`"
        )
    if path.suffix == ".pt":
        raise EmalignError(f"{path}: checkpoint file not found")
    raise EmalignError(f"unknown model {str(name_or_path)!r}; shipped: {', '.join(available())} or a .pt checkpoint")


def load(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu") -> FAEMReg:
    """A trained network from a shipped name (``"faemreg-small"``) or a checkpoint path, in eval mode."""
    path = checkpoint_path(name_or_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = FAEMReg(FAEMRegConfig.from_dict(ckpt["config"]))
        model.load_state_dict(ckpt["state"])
    except (KeyError, RuntimeError, TypeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise EmalignError(f"{path}: not a valid emalign checkpoint ({type(err).__name__})") from None
    return model.to(device).eval()


def checksum(name_or_path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint file, for provenance."""
    return hashlib.sha256(checkpoint_path(name_or_path).read_bytes()).hexdigest()[:16]


__all__ = ["CONFIGS", "DEFAULT_MODEL", "FAEMReg", "FAEMRegConfig", "available", "build", "checksum", "load"]
