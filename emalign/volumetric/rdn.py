"""RDN: Recursive Decomposition Network (Hu, Zhou, Xiong, Wu; IEEE JBHI 2022), re-implemented.

A feature pyramid shared by both volumes (stride-2 convolutions, then a top-down pass that adds
coarse context to each finer level, FPN-style) gives features at 1/2, 1/4, 1/8 and 1/16.

* Level-wise recursion: at each level, coarse to fine, ``steps`` refinement steps; each is a small
  estimator on ``[f_fixed, f_moving warped by the field so far, current field]`` that predicts an
  increment, composed into the level's field (``flow <- compose(flow, increment)``). The level's
  field is upsampled (values rescaled) to start the next level.
* Stage-wise recursion: the whole pyramid pass is repeated ``stages`` times; each stage starts
  from zero and sees the moving features warped by the field of the previous stages, and its
  result composes into the total (``total <- compose(total, stage field)``).

Every (stage, level, step) has its own estimator, as in the original. Here the moving features of
a step are warped once by the composition of the previous stages' field and the current field
(one interpolation instead of two successive ones). The final field is computed at 1/2 resolution
and upsampled. Loss: similarity + smoothness of every stage's field.

Shapes: ``fixed``, ``moving`` ``(N, 1, Z, Y, X)``, sizes multiples of 16; fields ``(N, 3, Z, Y, X)``
in voxels, pull convention (:mod:`emalign.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emalign.fields import compose_torch, warp_torch
from emalign.volumetric.common import (
    NetConfig,
    VolumeNet,
    VolumeOutput,
    conv,
    flow_head,
    resize_field,
    resize_volume,
    zeros_field,
)


@dataclass(frozen=True)
class RDNConfig(NetConfig):
    """Architecture of an RDN.

    Attributes:
        stages: stage-wise recursions (whole pyramid passes).
        steps: level-wise recursions (refinement steps per level and stage).
        pyramid: feature channels at 1/2, 1/4, 1/8, 1/16.
        estimator: hidden channels of each estimator's convolutions (then 3 output channels).
        slope: LeakyReLU slope.
    """

    stages: int = 4
    steps: int = 4
    pyramid: tuple[int, int, int, int] = (8, 16, 24, 32)
    estimator: tuple[int, ...] = (32, 16, 8)
    slope: float = 0.1


class Pyramid(nn.Module):
    """Bottom-up stride-2 convolutions and a top-down pass: features at 1/2, 1/4, 1/8, 1/16 (fine first)."""

    def __init__(self, channels: tuple[int, ...], slope: float) -> None:
        super().__init__()
        ins = (1, *channels[:-1])
        self.down = nn.ModuleList([conv(a, b, 2) for a, b in zip(ins, channels, strict=True)])
        self.lateral = nn.ModuleList([conv(channels[i + 1], channels[i]) for i in range(len(channels) - 1)])
        self.merge = nn.ModuleList([conv(2 * c, c) for c in channels[:-1]])
        self.slope = slope

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.down:
            x = F.leaky_relu(layer(x), self.slope)
            feats.append(x)
        out = [feats[-1]]
        for i in range(len(feats) - 2, -1, -1):
            up = F.leaky_relu(self.lateral[i](resize_volume(out[0], feats[i].shape[2:])), self.slope)
            out.insert(0, F.leaky_relu(self.merge[i](torch.cat([up, feats[i]], 1)), self.slope))
        return out


class Estimator(nn.Module):
    """A few 3 x 3 x 3 convolutions: ``[f_fixed, f_moving_warped, field] -> increment (3 channels)``."""

    def __init__(self, c_in: int, hidden: tuple[int, ...], slope: float) -> None:
        super().__init__()
        widths = (c_in, *hidden)
        self.convs = nn.ModuleList([conv(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.convs.append(flow_head(widths[-1]))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.convs[:-1]:
            x = F.leaky_relu(layer(x), self.slope)
        return self.convs[-1](x)


class RDN(VolumeNet):
    """Recursive Decomposition Network; ``forward(fixed, moving) -> VolumeOutput``."""

    kind = "rdn"
    divisor = 16

    def __init__(self, config: RDNConfig | None = None) -> None:
        config = config or RDNConfig()
        super().__init__(config)
        self.pyramid = Pyramid(config.pyramid, config.slope)
        levels = len(config.pyramid)
        self.estimators = nn.ModuleList(
            nn.ModuleList(
                nn.ModuleList(
                    Estimator(2 * config.pyramid[level] + 3, config.estimator, config.slope)
                    for _ in range(config.steps)
                )
                for level in range(levels)
            )
            for _ in range(config.stages)
        )

    def _stage(
        self, stage: int, fixed: list[torch.Tensor], moving: list[torch.Tensor], previous: torch.Tensor | None
    ) -> torch.Tensor:
        """One pyramid pass; returns the stage's field at the finest level (voxels of that grid)."""
        flow = zeros_field(fixed[-1])
        for level in range(len(fixed) - 1, -1, -1):
            flow = resize_field(flow, fixed[level].shape[2:])
            prior = None if previous is None else resize_field(previous, fixed[level].shape[2:])
            for estimator in self.estimators[stage][level]:
                current = flow if prior is None else compose_torch(prior, flow)
                warped = warp_torch(moving[level], current)
                increment = estimator(torch.cat([fixed[level], warped, flow], 1))
                flow = compose_torch(flow, increment)
        return flow

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> VolumeOutput:
        f_fixed, f_moving = self.pyramid(fixed), self.pyramid(moving)
        total = None
        stage_fields = []
        for stage in range(len(self.estimators)):
            flow = self._stage(stage, f_fixed, f_moving, total)
            total = flow if total is None else compose_torch(total, flow)
            stage_fields.append(resize_field(flow, fixed.shape[2:]))
        return VolumeOutput(field=resize_field(total, fixed.shape[2:]), increments=stage_fields)


PAPER = RDNConfig()
"""The paper's configuration (4 stages x 4 levels x 4 steps, pyramid 8-16-24-32): 3.65 M parameters
(the paper: about 3.6 M)."""
SMALL = RDNConfig(stages=2, steps=2, pyramid=(8, 12, 16, 24), estimator=(16, 8))
"""A CPU-friendly configuration (2 stages x 4 levels x 2 steps, narrower estimators)."""
