"""Volumetric (3D pairwise) registration: SDHNet, RDN and CRD, by name, with shipped small weights.

``build(name)`` makes an untrained network of a named configuration; ``load(name_or_path)`` a
trained one (a shipped name such as ``"sdhnet-small"`` or a ``.pt`` checkpoint). Registration of
whole volumes (patch-wise, blended) is :func:`emalign.volumetric.infer.register_volumes`.

Every network maps ``(fixed, moving)`` ``(N, 1, Z, Y, X)`` to a pull field ``(N, 3, Z, Y, X)`` in
voxels with channels ``(dz, dy, dx)``: ``warp(moving, u)`` is aligned with ``fixed``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from emalign.checkpoints import file_checksum, find_checkpoint, read_checkpoint
from emalign.errors import EmalignError
from emalign.options import DEFAULT_VOLUME_MODEL
from emalign.volumetric import crd, rdn, sdhnet
from emalign.volumetric.common import NetConfig, VolumeNet, VolumeOutput

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = DEFAULT_VOLUME_MODEL

FAMILIES: dict[str, tuple[type[VolumeNet], type[NetConfig]]] = {
    "sdhnet": (sdhnet.SDHNet, sdhnet.SDHNetConfig),
    "rdn": (rdn.RDN, rdn.RDNConfig),
    "crd": (crd.CRDStudent, crd.CRDConfig),
    "crd-teacher": (crd.FeatureShiftedTeacher, crd.CRDConfig),
}
"""Network family (checkpoint ``kind``) -> (class, config class)."""

CONFIGS: dict[str, tuple[str, NetConfig]] = {
    "sdhnet-paper": ("sdhnet", sdhnet.PAPER),
    "sdhnet-small": ("sdhnet", sdhnet.SMALL),
    "rdn-paper": ("rdn", rdn.PAPER),
    "rdn-small": ("rdn", rdn.SMALL),
    "crd-paper": ("crd", crd.PAPER),
    "crd-small": ("crd", crd.SMALL),
    "crd-teacher-paper": ("crd-teacher", crd.PAPER),
    "crd-teacher-small": ("crd-teacher", crd.SMALL),
}
"""Named architectures: name -> (family, configuration). ``*-paper`` are the papers' configurations."""

PAPER_PARAMETERS = {"sdhnet-paper": 4.0e6, "rdn-paper": 3.6e6, "crd-paper": 0.32e6, "crd-teacher-paper": 0.61e6}
"""Parameter counts of the original networks. SDHNet (about 4 M without its affine part) and RDN
(about 3.6 M) as SEEDS.md reports them; CRD's student and feature-shifted teacher counted from the
authors' public code (BlaiseBrain/CRD_registration: VoxelMorph-1 U-Net 0.32 M, FST 0.61 M)."""


def available() -> list[str]:
    """Names of the architectures (:func:`build`) and of the shipped checkpoints (:func:`load`)."""
    return sorted(set(CONFIGS) | {p.stem for p in WEIGHTS_DIR.glob("*.pt")})


def build(name: str) -> VolumeNet:
    """An untrained network of a named configuration (see :data:`CONFIGS`)."""
    if name not in CONFIGS:
        raise EmalignError(f"unknown volumetric model {name!r}; known: {', '.join(sorted(CONFIGS))}")
    family, config = CONFIGS[name]
    return FAMILIES[family][0](config)


def from_config(kind: str, config: dict) -> VolumeNet:
    """A network of family ``kind`` with the configuration dict of a checkpoint."""
    if kind not in FAMILIES:
        raise EmalignError(f"unknown volumetric network family {kind!r}; known: {', '.join(FAMILIES)}")
    cls, config_cls = FAMILIES[kind]
    return cls(config_cls.from_dict(config))


def save_checkpoint(path: str | Path, model: VolumeNet, **extra) -> None:
    """Write a checkpoint with the family, architecture, weights and ``extra`` metadata."""
    state = {"kind": model.kind, "config": model.config.to_dict(), "state": model.state_dict(), **extra}
    torch.save(state, path)


def checkpoint_path(name_or_path: str | Path) -> Path:
    """The file behind a shipped model name or a checkpoint path."""
    return find_checkpoint(name_or_path, WEIGHTS_DIR, CONFIGS, "emalign volume train", available())


def load(name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "cpu") -> VolumeNet:
    """A trained network from a shipped name or a checkpoint path, in eval mode on ``device``."""

    def build(checkpoint: dict) -> VolumeNet:
        return from_config(checkpoint["kind"], checkpoint["config"])

    return read_checkpoint(checkpoint_path(name_or_path), build, "emalign volumetric").to(device).eval()


def checksum(name_or_path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint file, for provenance."""
    return file_checksum(checkpoint_path(name_or_path))


__all__ = [
    "CONFIGS",
    "DEFAULT_MODEL",
    "FAMILIES",
    "PAPER_PARAMETERS",
    "VolumeNet",
    "VolumeOutput",
    "available",
    "build",
    "checksum",
    "from_config",
    "load",
    "save_checkpoint",
]
