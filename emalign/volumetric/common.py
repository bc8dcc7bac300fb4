"""Pieces shared by the volumetric networks: their output record, conv layers and field resizing.

Conventions (as in :mod:`emalign.fields`): volumes are ``(N, 1, Z, Y, X)`` float tensors
(intensities roughly in ``[0, 1]``); fields are ``(N, 3, Z, Y, X)`` pull fields with channels
``(dz, dy, dx)`` in voxels of the grid they are sampled on: ``warped(p) = moving(p + u(p))``
registers ``moving`` onto ``fixed``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from emalign.fields import rescale_torch


@dataclass
class VolumeOutput:
    """What a volumetric network returns for a batch of (fixed, moving) pairs.

    Attributes:
        field: ``(N, 3, Z, Y, X)`` final pull field, voxels of the input grid.
        increments: full-resolution fields that the smoothness term regularises (SDHNet's
            per-iteration increments, RDN's per-stage fields, the CRD field).
        intermediates: accumulated fields before the final one (SDHNet's self-distillation
            students), full resolution.
        attention: attention maps ``(N, z, y, x)`` (channel sums of squared decoder features)
            from coarse to fine, for CRD's feature distillation.
        penalty: an extra scalar loss the network asks for (SDHNet's affine regularisers), or None.
    """

    field: torch.Tensor
    increments: list[torch.Tensor] = dataclasses.field(default_factory=list)
    intermediates: list[torch.Tensor] = dataclasses.field(default_factory=list)
    attention: list[torch.Tensor] = dataclasses.field(default_factory=list)
    penalty: torch.Tensor | None = None


@dataclass(frozen=True)
class NetConfig:
    """Base of the architecture configurations: a frozen dataclass that round-trips through a dict."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


class VolumeNet(nn.Module):
    """A pairwise 3D registration network: ``forward(fixed, moving) -> VolumeOutput``.

    Subclasses set ``kind`` (the family name used in checkpoints) and ``divisor`` (spatial sizes
    must be multiples of it; :mod:`emalign.volumetric.infer` pads to it).
    """

    kind: str = ""
    divisor: int = 16

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config

    def parameter_count(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv3d:
    """3 x 3 x 3 convolution with padding 1 (stride 2 halves each axis, rounding up).

    He initialisation for LeakyReLU (slope 0.2), bias 0: activations keep their scale through the
    depth of the networks (PyTorch's default shrinks them about threefold per layer).
    """
    layer = nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
    nn.init.zeros_(layer.bias)
    return layer


def flow_head(c_in: int, gain: float = 0.01) -> nn.Conv3d:
    """The 3-channel convolution that outputs a field: He initialisation scaled by ``gain``, bias 0.

    Small (the map starts close to the identity) but not tiny: with VoxelMorph's N(0, 1e-5) the
    gradients reaching the layers below fall under Adam's epsilon and, measured, the networks barely
    learn in the first few hundred steps.
    """
    layer = conv(c_in, 3)
    with torch.no_grad():
        layer.weight.mul_(gain)
    nn.init.zeros_(layer.bias)
    return layer


def resize_field(flow: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A field in voxels of its own grid resized to ``size`` with its values rescaled (corner-aligned)."""
    size = tuple(int(s) for s in size)
    if tuple(flow.shape[2:]) == size:
        return flow
    return rescale_torch(flow, size)


def resize_volume(volume: torch.Tensor, size: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Trilinear (corner-aligned) resize of ``(N, C, Z, Y, X)`` features or images to ``size``."""
    size = tuple(int(s) for s in size)
    if tuple(volume.shape[2:]) == size:
        return volume
    return F.interpolate(volume, size=size, mode="trilinear", align_corners=True)


def zeros_field(like: torch.Tensor) -> torch.Tensor:
    """A zero field on the grid of ``like`` ``(N, C, Z, Y, X)``."""
    return like.new_zeros((like.shape[0], 3, *like.shape[2:]))


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """CRD's attention map: the channel sum of squared activations, ``(N, C, Z, Y, X) -> (N, Z, Y, X)``.

    Divided by its mean over the volume (per sample), as attention transfer normalises its maps:
    the map says where the features are strong, not how strong. Measured without it: the teacher's
    and student's raw maps differ ~100 times more (MSE ~50) than their fields (MSE ~0.5), and
    distillation made the student worse.
    """
    energy = features.float().square().sum(1)
    return energy / energy.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


__all__ = [
    "NetConfig",
    "VolumeNet",
    "VolumeOutput",
    "attention_map",
    "conv",
    "flow_head",
    "resize_field",
    "resize_volume",
    "zeros_field",
]
