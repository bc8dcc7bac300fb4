"""SDHNet: Self-Distilled Hierarchical Network (Zhou, Hu, Xiong, Wu; IEEE T-MI 2023), re-implemented.

Registration is split into ``T`` iterations. A context net on the fixed volume gives context
features and the initial hidden states at 1/4 resolution. In each iteration a feature extractor
(four stride-2 convolutions) runs on the fixed volume and on the moving volume warped by the field
so far; three ConvGRUs, one per scale (1/4, 1/8, 1/16), update their hidden states and each predict
a field increment (the hierarchical deformation fields); an adaptive fusion (softmax weights over
the three scales, conditioned on the fields and the context) merges them at 1/4 resolution and the
result is upsampled to full resolution and scaled by ``1 / T``. Increments compose,
``u <- compose(u, d)`` (warping by ``u`` then by ``d``), and the original moving volume is always
re-warped with the accumulated field. Iterations share no weights; hidden states carry across them.

Loss (see :func:`sdhnet_loss_terms`): similarity of the final warp + smoothness of every increment
+ the self-deformation distillation (:func:`self_distillation_loss`): the final field, detached, is
the teacher of the intermediate accumulated fields, in deformation-value space (RMS difference) and
deformation-gradient space (RMS difference of the forward differences along each axis). An optional
VTN-style affine stage runs first (``affine=True``).

Shapes: ``fixed``, ``moving`` ``(N, 1, Z, Y, X)``, sizes multiples of 16; fields ``(N, 3, Z, Y, X)``
in voxels, pull convention (:mod:`emalign.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emalign.fields import compose_torch, warp_torch
from emalign.volumetric.common import NetConfig, VolumeNet, VolumeOutput, conv, flow_head, resize_field

_SCALES = 3  # ConvGRUs at 1/4, 1/8, 1/16


@dataclass(frozen=True)
class SDHNetConfig(NetConfig):
    """Architecture of an SDHNet.

    Attributes:
        iterations: T, the number of iterations (no weight sharing between them).
        features: extractor channels at 1/2, 1/4, 1/8 and 1/16 resolution.
        hidden: channels of each ConvGRU's hidden state.
        context: channels of the context features (1/4 resolution).
        context_convs: channels of the context net's two inner convolutions (1/2, 1/4).
        fusion: channels of the fusion net's two hidden convolutions.
        affine: run a VTN-style affine stage first.
        slope: LeakyReLU slope.
        first_stride: stride of the first convolution of the extractor and of the context net; 2
            (the paper) puts the ConvGRUs at 1/4, 1/8, 1/16, 1 at 1/2, 1/4, 1/8 (finer fields,
            for small training crops).
    """

    iterations: int = 6
    features: tuple[int, int, int, int] = (16, 32, 48, 64)
    hidden: int = 16
    context: int = 32
    context_convs: tuple[int, int] = (16, 32)
    fusion: tuple[int, int] = (48, 16)
    affine: bool = False
    slope: float = 0.1
    first_stride: int = 2


class ContextNet(nn.Module):
    """Fixed volume -> context features (ReLU) and initial hidden states (tanh) at 1/4, 1/8, 1/16."""

    def __init__(self, cfg: SDHNetConfig) -> None:
        super().__init__()
        c1, c2 = cfg.context_convs
        self.context, self.hidden, self.slope = cfg.context, cfg.hidden, cfg.slope
        self.convs = nn.ModuleList(
            [conv(1, c1, cfg.first_stride), conv(c1, c1), conv(c1, c2, 2), conv(c2, cfg.context + cfg.hidden)]
        )

    def forward(self, fixed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = fixed
        for i, layer in enumerate(self.convs):
            x = layer(x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, self.slope)
        ctx, hid = torch.split(x, [self.context, self.hidden], dim=1)
        hidden = [torch.tanh(hid), torch.tanh(F.max_pool3d(hid, 2, ceil_mode=True))]
        hidden.append(torch.tanh(F.max_pool3d(hid, 4, ceil_mode=True)))
        return torch.relu(ctx), hidden


class Extractor(nn.Module):
    """Four stride-2 convolutions (the first may have stride 1); returns the last three features (1/4, 1/8, 1/16)."""

    def __init__(self, channels: tuple[int, ...], slope: float, first_stride: int = 2) -> None:
        super().__init__()
        ins = (1, *channels[:-1])
        strides = (first_stride, 2, 2, 2)
        self.convs = nn.ModuleList([conv(a, b, s) for a, b, s in zip(ins, channels, strides, strict=True)])
        self.slope = slope

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.convs:
            x = F.leaky_relu(layer(x), self.slope)
            out.append(x)
        return out[1:]


class ConvGRU(nn.Module):
    """A 3D convolutional GRU cell with a two-layer field head: ``(h, x) -> (increment, h')``."""

    def __init__(self, c_in: int, hidden: int, slope: float) -> None:
        super().__init__()
        self.gate_z = conv(hidden + c_in, hidden)
        self.gate_r = conv(hidden + c_in, hidden)
        self.candidate = conv(hidden + c_in, hidden)
        self.head = nn.ModuleList([conv(hidden, hidden), flow_head(hidden, 0.1)])
        self.slope = slope

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hx = torch.cat([h, x], 1)
        z = torch.sigmoid(self.gate_z(hx))
        r = torch.sigmoid(self.gate_r(hx))
        q = torch.tanh(self.candidate(torch.cat([r * h, x], 1)))
        h = (1 - z) * h + z * q
        flow = self.head[1](F.leaky_relu(self.head[0](h), self.slope))
        return flow, h


class Fusion(nn.Module):
    """Adaptive fusion: per-voxel softmax weights over the three scales' fields (per component)."""

    def __init__(self, cfg: SDHNetConfig) -> None:
        super().__init__()
        f1, f2 = cfg.fusion
        self.convs = nn.ModuleList([conv(cfg.context + 3 * _SCALES, f1), conv(f1, f2), conv(f2, 3 * _SCALES)])
        self.slope = cfg.slope

    def forward(self, context: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
        x = torch.cat([context, flows], 1)
        for i, layer in enumerate(self.convs):
            x = layer(x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, self.slope)
        n, _, *spatial = flows.shape
        weights = F.softmax(x.view(n, _SCALES, 3, *spatial), dim=1)
        return (flows.view(n, _SCALES, 3, *spatial) * weights).sum(1)


class Iteration(nn.Module):
    """One SDHNet iteration: extractor, three ConvGRUs, fusion -> increment at 1/4 resolution."""

    def __init__(self, cfg: SDHNetConfig) -> None:
        super().__init__()
        self.extract = Extractor(cfg.features, cfg.slope, cfg.first_stride)
        self.grus = nn.ModuleList([ConvGRU(2 * c, cfg.hidden, cfg.slope) for c in cfg.features[1:]])
        self.fusion = Fusion(cfg)

    def forward(
        self, fixed: torch.Tensor, warped: torch.Tensor, context: torch.Tensor, hidden: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = [torch.cat(pair, 1) for pair in zip(self.extract(fixed), self.extract(warped), strict=True)]
        flows, new_hidden = [], []
        for gru, h, x in zip(self.grus, hidden, feats, strict=True):
            flow, h = gru(h, x)
            flows.append(resize_field(flow, context.shape[2:]))
            new_hidden.append(h)
        return self.fusion(context, torch.cat(flows, 1)), new_hidden


class AffineStage(nn.Module):
    """VTN-style affine stage: strided convs on the pair, global pooling, 12 parameters (identity at start).

    The field is ``u(p) = W (p - c) + b`` in voxels (``c`` the volume centre); ``penalty`` is VTN's
    ``0.1 * ((det(I + W) - 1)^2 + orthogonality)``, which keeps the map close to a rotation.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), slope: float = 0.1) -> None:
        super().__init__()
        ins = (2, *channels[:-1])
        self.convs = nn.ModuleList([conv(a, b, 2) for a, b in zip(ins, channels, strict=True)])
        self.head = nn.Linear(channels[-1], 12)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.slope = slope

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([fixed, moving], 1)
        for layer in self.convs:
            x = F.leaky_relu(layer(x), self.slope)
        params = self.head(x.mean(dim=(2, 3, 4)))
        w, b = params[:, :9].view(-1, 3, 3), params[:, 9:]
        spatial = fixed.shape[2:]
        axes = [torch.arange(n, device=fixed.device, dtype=fixed.dtype) - (n - 1) / 2 for n in spatial]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, V)
        flow = (w @ grid + b[:, :, None]).view(-1, 3, *spatial)
        a = torch.eye(3, device=w.device, dtype=w.dtype) + w
        det = torch.linalg.det(a)
        c = a.transpose(1, 2) @ a + 1e-5 * torch.eye(3, device=w.device, dtype=w.dtype)
        eig = torch.linalg.eigvalsh(c)  # the orthogonality term sum(l + 1/l) - 6 of VTN, >= 0
        ortho = (eig + 1 / eig).sum(1) - 6
        return flow, 0.1 * ((det - 1).square() + ortho).sum()


class SDHNet(VolumeNet):
    """Self-Distilled Hierarchical Network; ``forward(fixed, moving) -> VolumeOutput``."""

    kind = "sdhnet"
    divisor = 16

    def __init__(self, config: SDHNetConfig | None = None) -> None:
        config = config or SDHNetConfig()
        super().__init__(config)
        self.context = ContextNet(config)
        self.iterations = nn.ModuleList([Iteration(config) for _ in range(config.iterations)])
        self.affine = AffineStage(slope=config.slope) if config.affine else None

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> VolumeOutput:
        context, hidden = self.context(fixed)
        scale = 1.0 / len(self.iterations)
        penalty, total = None, None
        if self.affine is not None:
            total, penalty = self.affine(fixed, moving)
        warped = moving if total is None else warp_torch(moving, total)
        increments, accumulated = [], []
        for block in self.iterations:
            step, hidden = block(fixed, warped, context, hidden)
            step = resize_field(step, fixed.shape[2:]) * scale
            total = step if total is None else compose_torch(total, step)
            warped = warp_torch(moving, total)
            increments.append(step)
            accumulated.append(total)
        return VolumeOutput(field=total, increments=increments, intermediates=accumulated[:-1], penalty=penalty)


def _gradients(flow: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of a ``(N, 3, Z, Y, X)`` field along z, y and x."""
    return [flow.diff(dim=d) for d in (2, 3, 4)]


def self_distillation_loss(intermediates: list[torch.Tensor], final: torch.Tensor, gamma: float = 0.8) -> torch.Tensor:
    """SDHNet's self-deformation distillation: the final field teaches the intermediate ones.

    For each intermediate accumulated field ``u_t`` (t = 1 .. T-1) and the detached final field
    ``u_T``: value term ``RMS(u_t - u_T)`` (voxels) plus gradient term, the mean over the three axes
    of ``RMS(d u_t - d u_T)`` (forward differences, voxels per voxel). Later fields weigh more
    (``gamma ** (T - 1 - t)``); the sum is divided by ``T - 1``. Zero when there are no
    intermediates.
    """
    if not intermediates:
        return final.new_zeros(())
    teacher = final.detach()
    teacher_grads = _gradients(teacher)
    total = final.new_zeros(())
    count = len(intermediates)
    for t, student in enumerate(intermediates, start=1):
        value = (student - teacher).square().mean().add(1e-12).sqrt()
        grads = [
            (g - tg).square().mean().add(1e-12).sqrt() for g, tg in zip(_gradients(student), teacher_grads, strict=True)
        ]
        total = total + gamma ** (count - t) * (value + sum(grads) / 3)
    return total / count


PAPER = SDHNetConfig()
"""The paper's configuration (6 iterations, extractor 16-32-48-64, hidden 16, context 32): 4.12 M
parameters without the affine stage (the paper: about 4 M)."""
SMALL = SDHNetConfig(
    iterations=3, features=(8, 16, 24, 32), hidden=8, context=8, context_convs=(8, 16), fusion=(16, 8), first_stride=1
)
"""A CPU-friendly configuration (3 iterations, half the channels) with the ConvGRUs at 1/2, 1/4, 1/8: on small
crops the paper's 1/4, 1/8, 1/16 learned far later (benchmarks/results/design_choices.md)."""
