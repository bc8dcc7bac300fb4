"""CRD: Cross-Resolution Distillation (Hu, Zhou, Xiong, Wu; IEEE T-CSVT 2022), re-implemented.

Goal: a low-resolution student (input downsampled x0.5, field upsampled and doubled) that keeps
the accuracy of a full-resolution model at a fraction of its memory and time.

* :class:`UNet`: the VoxelMorph-like base (encoder 16-32-32-32-32, one full-resolution and four
  stride-2 convolutions; decoder with skips). It returns its field and its decoder features at
  1/16, 1/8, 1/4, 1/2 and 1 of its input.
* :class:`CRDStudent`: the U-Net on the half-resolution pair; its field is upsampled to full
  resolution (values doubled). The same architecture, trained alone, is the pre-trained
  low-resolution model the student starts from.
* :class:`FeatureShiftedTeacher` (FST): the same U-Net (shared weights) runs on the full- and the
  half-resolution pair; each half-resolution decoder feature is "shifted" to the full-resolution
  feature of the same absolute size (half-res 1/8 <-> full-res 1/16, ...) and fused with it by a
  second decoder whose head gives the teacher's field.
* Distillation (:func:`distillation_loss`): MSE between the student's and the frozen teacher's
  fields plus MSE between their attention maps (channel sums of squared features, normalised by
  their mean: :func:`emalign.volumetric.common.attention_map`) at the four shared absolute scales
  1/16, 1/8, 1/4, 1/2, all weight 1.

The schedule (teacher first, the low-resolution model next, then the student from it) lives in
:func:`emalign.volumetric.train.train_crd`.

Shapes: ``fixed``, ``moving`` ``(N, 1, Z, Y, X)``, sizes multiples of 32 for the student (16 after
halving); fields ``(N, 3, Z, Y, X)`` in voxels of the full-resolution grid, pull convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from emalign.volumetric.common import (
    NetConfig,
    VolumeNet,
    VolumeOutput,
    attention_map,
    conv,
    flow_head,
    resize_field,
    resize_volume,
)


@dataclass(frozen=True)
class CRDConfig(NetConfig):
    """Architecture of the CRD U-Net (shared by teacher, low-resolution model and student).

    Attributes:
        encoder: channels of the five encoder convolutions (the first at full resolution of the
            U-Net's input, the others stride 2).
        decoder: channels of the decoder convolutions at 1/16, 1/8, 1/4, 1/2, the extra one at
            1/2, and the one at 1 (VoxelMorph's 32, 32, 32, 32, 16, 16).
        scale: the student's input scale (0.5).
        slope: LeakyReLU slope.
    """

    encoder: tuple[int, int, int, int, int] = (16, 32, 32, 32, 32)
    decoder: tuple[int, int, int, int, int, int] = (32, 32, 32, 32, 16, 16)
    scale: float = 0.5
    slope: float = 0.2


def _nearest(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="nearest")


class UNet(nn.Module):
    """VoxelMorph-like U-Net on a (fixed, moving) pair: field and decoder features at 1/16 .. 1."""

    def __init__(self, cfg: CRDConfig) -> None:
        super().__init__()
        e, d = cfg.encoder, cfg.decoder
        self.encoder = nn.ModuleList([conv(2, e[0])] + [conv(e[i], e[i + 1], 2) for i in range(4)])
        self.decoder = nn.ModuleList(
            [
                conv(e[4], d[0]),  # 1/16
                conv(d[0] + e[3], d[1]),  # 1/8
                conv(d[1] + e[2], d[2]),  # 1/4
                conv(d[2] + e[1], d[3]),  # 1/2
                conv(d[3], d[4]),  # 1/2
                conv(d[4] + e[0], d[5]),  # 1
            ]
        )
        self.flow = flow_head(d[5])
        self.slope = cfg.slope

    def forward(self, pair: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pair (N, 2, Z, Y, X)`` -> (field in voxels of this grid, features at 1/16, 1/8, 1/4, 1/2, 1)."""
        act = lambda t: F.leaky_relu(t, self.slope)  # noqa: E731
        skips = []
        x = pair
        for layer in self.encoder:
            x = act(layer(x))
            skips.append(x)
        d16 = act(self.decoder[0](x))
        d8 = act(self.decoder[1](torch.cat([_nearest(d16, skips[3].shape[2:]), skips[3]], 1)))
        d4 = act(self.decoder[2](torch.cat([_nearest(d8, skips[2].shape[2:]), skips[2]], 1)))
        d2 = act(self.decoder[4](act(self.decoder[3](torch.cat([_nearest(d4, skips[1].shape[2:]), skips[1]], 1)))))
        d1 = act(self.decoder[5](torch.cat([_nearest(d2, skips[0].shape[2:]), skips[0]], 1)))
        return self.flow(d1), [d16, d8, d4, d2, d1]


def _half(pair: torch.Tensor, scale: float) -> torch.Tensor:
    size = [max(1, round(n * scale)) for n in pair.shape[2:]]
    return F.interpolate(pair, size=size, mode="trilinear", align_corners=True)


class CRDStudent(VolumeNet):
    """The low-resolution model: the U-Net on the pair downsampled by ``scale``, field upsampled to full size.

    Attention maps (for distillation) come from its decoder at 1/8, 1/4, 1/2 and 1 of its input,
    i.e. 1/16, 1/8, 1/4 and 1/2 of the full resolution.
    """

    kind = "crd"
    divisor = 32

    def __init__(self, config: CRDConfig | None = None) -> None:
        config = config or CRDConfig()
        super().__init__(config)
        self.unet = UNet(config)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> VolumeOutput:
        low = _half(torch.cat([fixed, moving], 1), self.config.scale)
        flow, feats = self.unet(low)
        field = resize_field(flow, fixed.shape[2:])
        return VolumeOutput(field=field, increments=[field], attention=[attention_map(f) for f in feats[1:]])


class FeatureShiftedTeacher(VolumeNet):
    """The feature-shifted teacher: a shared U-Net on the full- and half-resolution pair, fused.

    Fusion decoder (coarse to fine): at 1/16 the full-resolution 1/16 feature and the
    half-resolution 1/8 feature; at 1/8, 1/4, 1/2 the upsampled fused feature and both branches'
    features of that absolute size; at 1 the upsampled fused feature and the full-resolution 1
    feature; then a field head. Attention maps: the fused features at 1/16, 1/8, 1/4, 1/2.
    """

    kind = "crd-teacher"
    divisor = 32

    def __init__(self, config: CRDConfig | None = None) -> None:
        config = config or CRDConfig()
        super().__init__(config)
        self.unet = UNet(config)
        d = config.decoder
        full = (d[0], d[1], d[2], d[4], d[5])  # full-resolution features at 1/16, 1/8, 1/4, 1/2, 1
        low = (d[1], d[2], d[4], d[5])  # half-resolution features at (absolute) 1/16, 1/8, 1/4, 1/2
        widths = (d[0], d[1], d[2], d[3], d[5])
        ins = [full[0] + low[0]] + [widths[i - 1] + full[i] + low[i] for i in (1, 2, 3)] + [widths[3] + full[4]]
        self.fuse = nn.ModuleList([conv(a, b) for a, b in zip(ins, widths, strict=True)])
        self.flow = flow_head(widths[-1])

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> VolumeOutput:
        pair = torch.cat([fixed, moving], 1)
        _, full = self.unet(pair)
        _, low = self.unet(_half(pair, self.config.scale))
        low = low[1:]  # half-resolution 1/8 .. 1 = absolute 1/16 .. 1/2
        act = lambda t: F.leaky_relu(t, self.config.slope)  # noqa: E731
        x = act(self.fuse[0](torch.cat([full[0], resize_volume(low[0], full[0].shape[2:])], 1)))
        fused = [x]
        for i in (1, 2, 3):
            size = full[i].shape[2:]
            x = act(self.fuse[i](torch.cat([resize_volume(x, size), full[i], resize_volume(low[i], size)], 1)))
            fused.append(x)
        x = act(self.fuse[4](torch.cat([resize_volume(x, full[4].shape[2:]), full[4]], 1)))
        field = self.flow(x)
        return VolumeOutput(field=field, increments=[field], attention=[attention_map(f) for f in fused])


def distillation_loss(student: VolumeOutput, teacher: VolumeOutput) -> tuple[torch.Tensor, dict[str, float]]:
    """CRD's distillation: ``MSE(field_s, field_t) + sum_k MSE(attention_s_k, attention_t_k)`` (teacher detached).

    Attention maps are compared at the four shared absolute scales (resized to the teacher's map
    when their sizes differ by rounding). Returns the loss and its two parts.
    """
    field = F.mse_loss(student.field, teacher.field.detach())
    attention = student.field.new_zeros(())
    for s, t in zip(student.attention, teacher.attention, strict=True):
        if s.shape != t.shape:
            s = resize_volume(s.unsqueeze(1), t.shape[1:]).squeeze(1)
        attention = attention + F.mse_loss(s, t.detach())
    return field + attention, {"field_mse": field.item(), "attention_mse": attention.item()}


PAPER = CRDConfig()
"""The paper's base (VoxelMorph-like U-Net 16-32-32-32-32): student 0.32 M parameters, feature-shifted
teacher 0.61 M (counts of the authors' public code, BlaiseBrain/CRD_registration)."""
SMALL = CRDConfig(encoder=(8, 16, 16, 16, 16), decoder=(16, 16, 16, 16, 8, 8))
"""A CPU-friendly configuration (half the channels)."""
