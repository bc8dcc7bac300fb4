"""FAEMReg: serial-section registration with 3D convolution over adjacent sections.

The network sees a short stack of ``D = 2K + 1`` sections with the moving section in the
middle (depth index ``K``) and predicts one 2D pull field for the moving section, so that
``warp(moving, field)`` lines up with the references around it. Depth is never
downsampled: encoder strides are ``(1, 2, 2)``; flow heads collapse depth with a
``(D, 3, 3)`` convolution.

Reference layouts (both ``D = 2K + 1`` deep, nearest references next to the moving one):

* ``sequential`` (the paper's): ``[z-K, ..., z-1, z, z-1, ..., z-K]`` (mirrored);
* ``symmetric`` (the pipeline's): ``[z-K, ..., z-1, z, z+1, ..., z+K]``.

Beyond the paper (configurable, off in ``faemreg-paper``): a validity channel, a reduced
input scale with the field upsampled back, and a local correlation (cost volume) between
the warped moving features and every section's features at the coarse decoder levels
(the authors' successor EMReg's idea), which makes learning to match across the content
change of 40 nm sections fast.

Configurations (:data:`CONFIGS`): ``faemreg-paper`` (the paper's), ``faemreg-small`` (the shipped
default) and ``faemreg-fast``: ``faemreg-small`` without the cost volume at its finest decoder
level, the most expensive part of its forward pass (its speed and accuracy: the model card), shipped as a
student distilled from ``faemreg-small`` (:mod:`emalign.train`); ``faemreg-wide``: ``faemreg-small`` with twice
its channels, an architecture to train where a GPU makes its cost small (``benchmarks/gpu_train.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from emalign.fields import rescale_torch, warp_torch

Level = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class FAEMRegConfig:
    """Architecture of a FAEMReg network.

    Attributes:
        references: K, references on each side of the moving section (depth 2K + 1).
        encoder: per level, the convolutions ``(channels, kernel_yx)``; the first of each
            level has stride (1, 2, 2); depth kernels are 3.
        decoder: channels of the transposed-conv decoder, deepest first; its length sets
            how far up the field is predicted (output level = len(encoder) - len(decoder)).
        input_scale: the stack is resized by this factor before the network (0.5 = half).
        correlation_radius: radius of the local cost volume, 0 for none; the cost volume
            and its soft-argmax displacement per section feed the decoder and the heads.
        correlation_levels: encoder levels (1 = half resolution) that get a cost volume.
        flow_scale: multiplier of the heads' outputs (pixels of the level's grid).
        validity_channel: add a channel marking pixels with data (non-zero).
        deconv_depth_kernel: depth extent of the decoder's transposed convolutions.
    """

    name: str
    references: int = 3
    encoder: tuple[Level, ...] = ()
    decoder: tuple[int, ...] = ()
    input_scale: float = 1.0
    correlation_radius: int = 0
    correlation_levels: tuple[int, ...] = ()
    flow_scale: float = 1.0
    validity_channel: bool = False
    deconv_depth_kernel: int = 1

    @property
    def depth(self) -> int:
        return 2 * self.references + 1

    @property
    def levels(self) -> int:
        return len(self.encoder)

    @property
    def output_level(self) -> int:
        return self.levels - len(self.decoder)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FAEMRegConfig:
        data = dict(data)
        data["encoder"] = tuple(tuple(tuple(conv) for conv in level) for level in data["encoder"])
        for key in ("decoder", "correlation_levels"):
            data[key] = tuple(data[key])
        return cls(**data)


CONFIGS: dict[str, FAEMRegConfig] = {
    "faemreg-paper": FAEMRegConfig(
        name="faemreg-paper",
        references=3,
        encoder=(
            ((32, 7),),
            ((64, 5),),
            ((128, 5), (128, 3)),
            ((256, 3), (256, 3)),
            ((256, 3), (256, 3)),
            ((512, 3), (512, 3)),
        ),
        decoder=(256, 128, 64, 32, 16, 8),
        flow_scale=20.0,
    ),
    "faemreg-small": FAEMRegConfig(
        name="faemreg-small",
        references=3,
        encoder=(((16, 5),), ((24, 3),), ((32, 3),), ((48, 3),)),
        decoder=(32, 24, 16),
        input_scale=0.5,
        correlation_radius=3,
        correlation_levels=(3, 2, 1),
        validity_channel=True,
    ),
}
CONFIGS["faemreg-fast"] = replace(CONFIGS["faemreg-small"], name="faemreg-fast", correlation_levels=(3, 2))
CONFIGS["faemreg-wide"] = replace(
    CONFIGS["faemreg-small"],
    name="faemreg-wide",
    encoder=(((32, 5),), ((48, 3),), ((64, 3),), ((96, 3),)),
    decoder=(64, 48, 32),
)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, (3, k, k), stride=(1, stride, stride), padding=(1, k // 2, k // 2)), _act()
    )


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Feature vectors (dim 1) centred and scaled to unit length; all-equal vectors become 0."""
    centred = features - features.mean(1, keepdim=True)
    return centred * torch.rsqrt(centred.square().sum(1, keepdim=True).clamp_min(1e-24))


def shifted_copies(images: torch.Tensor, radius: int) -> torch.Tensor:
    """``images (N, ..., H, W)`` seen from every offset: ``(N, (2r+1)^2, ..., H, W)`` holding ``images(p + o)``
    (zeros beyond the border); offset ``o = (dy, dx)`` is channel ``(dy + r) * (2r + 1) + (dx + r)``."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius))
    size = 2 * radius + 1
    return torch.stack(
        [padded[..., dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)], dim=1
    )


def local_correlation(moving: torch.Tensor, stack: torch.Tensor, radius: int, strip: int = 16) -> torch.Tensor:
    """Cost volume between one moving feature map and every section of a feature stack.

    Args:
        moving: ``(N, C, H, W)`` features of the (warped) moving section.
        stack: ``(N, C, D, H, W)`` features of every section.
        radius: offsets ``-radius..radius`` in y and x.
        strip: rows computed at a time (keeps the temporaries in cache; results do not depend on it).

    Returns:
        ``(N, (2r+1)^2, D, H, W)``: the correlation (over channels) of ``moving(p)`` and
        ``stack_d(p + o)``, each feature vector centred and unit-normalised, in [-1, 1]
        (0 outside the stack); channels ordered as in :func:`shifted_copies`.
    """
    moving, stack = _unit(moving), _unit(stack)
    height, width = stack.shape[-2:]
    padded = F.pad(stack, (radius, radius, radius, radius))
    rows = []
    for y0 in range(0, height, strip):
        y1 = min(y0 + strip, height)
        slab = padded[..., y0 : y1 + 2 * radius, :]
        centre = moving[:, :, None, y0:y1]
        costs = [
            (slab[..., dy : dy + y1 - y0, dx : dx + width] * centre).sum(1)
            for dy in range(2 * radius + 1)
            for dx in range(2 * radius + 1)
        ]
        rows.append(torch.stack(costs, 1))
    return torch.cat(rows, dim=3)


def box_sum(images: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over the ``size x size`` neighbourhood of every pixel (zeros beyond the border); any ``(..., H, W)``."""
    height, width = images.shape[-2:]
    r = size // 2
    padded = F.pad(images, (r, r, r, r))
    rows = padded[..., :height, :].clone()
    for dy in range(1, size):
        rows += padded[..., dy : dy + height, :]
    sums = rows[..., :width].clone()
    for dx in range(1, size):
        sums += rows[..., dx : dx + width]
    return sums


def patch_correlation(moving: torch.Tensor, images: torch.Tensor, radius: int, size: int = 5) -> torch.Tensor:
    """Local normalised cross-correlation of ``size x size`` patches: classic block matching,
    a matcher that works before any training.

    Args:
        moving: ``(N, H, W)`` the (warped) moving section.
        images: ``(N, D, H, W)`` every section.
        radius: offsets ``-radius..radius`` in y and x.
        size: patch side (odd); patches reaching beyond the border hold zeros there.

    Returns:
        ``(N, (2r+1)^2, D, H, W)``: the NCC of the patch of ``moving`` at ``p`` and the patch of
        section d at ``p + o``, in [-1, 1] (0 for flat patches and outside the sections); channels
        ordered as in :func:`shifted_copies`. Computed with box sums, ``sum(m s) - sum(m) mean(s)``
        over the patch per offset, instead of correlating ``size^2``-long patch vectors.
    """
    count = size * size
    moving = moving[:, None]
    sum_m = box_sum(moving, size)
    inv_m = torch.rsqrt((box_sum(moving.square(), size) - sum_m.square() / count).clamp_min(1e-24))
    sum_s = box_sum(images, size)
    inv_s = torch.rsqrt((box_sum(images.square(), size) - sum_s.square() / count).clamp_min(1e-24))
    costs = box_sum(shifted_copies(images, radius) * moving[:, None], size)
    costs -= sum_m[:, None] * shifted_copies(sum_s / count, radius)
    costs *= shifted_copies(inv_s, radius)
    return costs * inv_m[:, None]


def depth_head(feats: torch.Tensor, head: nn.Conv3d) -> torch.Tensor:
    """``head`` (a ``(D, 3, 3)`` convolution, padding ``(0, 1, 1)``, few outputs) on ``feats (N, C, D, H, W)``
    -> ``(N, out, H, W)``.

    Same result as ``head(feats).squeeze(2)``, computed as one matrix product of the nine taps'
    weights with the features followed by nine shifted sums: convolution libraries are slow
    with two output channels.
    """
    n, channels, depth, height, width = feats.shape
    out_ch = head.out_channels
    taps = head.weight.permute(3, 4, 0, 1, 2).reshape(9 * out_ch, channels * depth)
    per_tap = torch.matmul(taps, feats.reshape(n, channels * depth, height * width))
    per_tap = F.pad(per_tap.view(n, 9, out_ch, height, width), (1, 1, 1, 1))
    out = per_tap[:, 0, :, :height, :width] + head.bias.view(1, out_ch, 1, 1)
    for tap in range(1, 9):
        dy, dx = divmod(tap, 3)
        out += per_tap[:, tap, :, dy : dy + height, dx : dx + width]
    return out


def soft_argmax_flow(costs: torch.Tensor, radius: int, sharpness: torch.Tensor) -> torch.Tensor:
    """Pull displacement of the moving section towards each section, from a cost volume.

    ``costs (N, (2r+1)^2, D, H, W)`` -> ``(N, 2, D, H, W)`` (dy, dx) in pixels of this grid:
    the expected offset under ``softmax(sharpness * cost)``, negated (the moving section
    at ``p`` looks like section d at ``p + o``, so the moving one is pulled by ``-o``).
    """
    offsets = torch.arange(-radius, radius + 1, device=costs.device, dtype=costs.dtype)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    pull = -torch.stack([oy.reshape(-1), ox.reshape(-1)])
    prob = torch.softmax(costs * sharpness, dim=1)
    return torch.matmul(pull, prob.flatten(2)).view(costs.shape[0], 2, *costs.shape[2:])


class FAEMReg(nn.Module):
    """FAEMReg network; ``forward(stack (N, D, H, W)) -> field (N, 2, H, W)``.

    The input stack holds ``D = 2K + 1`` sections (float, any range; zeros mean no data),
    the moving section at depth ``K``. The output is the moving section's pull field in
    pixels of the input grid: ``warp(moving, field)`` matches the references.
    """

    def __init__(self, config: FAEMRegConfig):
        super().__init__()
        self.config = config
        depth = config.depth
        in_ch = 2 if config.validity_channel else 1
        self.encoder = nn.ModuleList()
        channels = [in_ch]
        for level in config.encoder:
            convs, c_prev = [], channels[-1]
            for i, (c_out, k) in enumerate(level):
                convs.append(_conv(c_prev, c_out, k, stride=2 if i == 0 else 1))
                c_prev = c_out
            self.encoder.append(nn.Sequential(*convs))
            channels.append(c_prev)
        corr_ch = (2 * config.correlation_radius + 1) ** 2 + 2 if config.correlation_radius else 0
        self.sharpness = nn.Parameter(torch.full((config.levels + 1,), 20.0))
        self.learned_cost_gain = nn.Parameter(torch.full((config.levels + 1,), 0.1))
        distance = torch.arange(-config.references, config.references + 1).abs().float()
        self.slot_logits = nn.Parameter(-torch.log(distance.clamp_min(1.0)))

        def extra(level: int) -> int:
            return corr_ch if level in config.correlation_levels else 0

        deepest = config.levels
        self.heads = nn.ModuleDict()
        self.heads[str(deepest)] = self._head(channels[deepest] + extra(deepest), depth)
        self.decoder = nn.ModuleList()
        c_dec = channels[deepest] + extra(deepest)
        kd = config.deconv_depth_kernel
        for i, c_out in enumerate(config.decoder):
            level = deepest - 1 - i
            self.decoder.append(
                nn.Sequential(
                    nn.ConvTranspose3d(c_dec, c_out, (kd, 4, 4), stride=(1, 2, 2), padding=(kd // 2, 1, 1)), _act()
                )
            )
            c_dec = c_out + channels[level] + 2 + extra(level)
            self.heads[str(level)] = self._head(c_dec, depth)

    @staticmethod
    def _head(c_in: int, depth: int) -> nn.Conv3d:
        head = nn.Conv3d(c_in, 2, (depth, 3, 3), padding=(0, 1, 1))
        nn.init.normal_(head.weight, std=1e-3)
        nn.init.zeros_(head.bias)
        return head

    def _with_correlation(
        self, feats: torch.Tensor, image: torch.Tensor, level: int, flow: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features with the cost volume appended, and the matched displacement (or None).

        The cost volume is block matching on raw 5 x 5 patches of ``image`` (the input
        stack at this level's resolution, ``(N, D, h, w)``) plus a learned-gain cost on
        the encoder's features. The matched displacement is its soft-argmax towards every
        reference, averaged with learned per-slot weights (the moving slot excluded); it is
        added to the level's field, so the network starts as a working block matcher and
        its features get a direct training signal.
        """
        if level not in self.config.correlation_levels:
            return feats, None
        radius, k = self.config.correlation_radius, self.config.references
        moving, moving_image = feats[:, :, k], image[:, k : k + 1]
        if flow is not None:
            moving = warp_torch(moving, flow, padding_mode="zeros")
            moving_image = warp_torch(moving_image, flow, padding_mode="zeros")
        costs = patch_correlation(moving_image[:, 0], image, radius)
        costs += self.learned_cost_gain[level] * local_correlation(moving, feats, radius)
        matched = soft_argmax_flow(costs, radius, self.sharpness[level])
        slot_mask = torch.ones_like(self.slot_logits)
        slot_mask[k] = 0
        weights = torch.softmax(self.slot_logits.masked_fill(slot_mask == 0, -torch.inf), 0)
        return torch.cat([feats, costs, matched], 1), (matched * weights.view(1, 1, -1, 1, 1)).sum(2)

    def _flow(self, feats: torch.Tensor, level: int, matched: torch.Tensor | None) -> torch.Tensor:
        flow = depth_head(feats, self.heads[str(level)]) * self.config.flow_scale
        return flow if matched is None else flow + matched

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if stack.ndim != 4 or stack.shape[1] != cfg.depth:
            raise ValueError(f"{cfg.name} expects (N, {cfg.depth}, H, W) stacks; got {tuple(stack.shape)}")
        full_size = tuple(stack.shape[-2:])
        x = stack
        if cfg.input_scale != 1.0:
            x = F.interpolate(x, scale_factor=cfg.input_scale, mode="area" if cfg.input_scale < 1 else "bilinear")
        net_size = tuple(x.shape[-2:])
        multiple = 2**cfg.levels
        pad_y, pad_x = (-net_size[0]) % multiple, (-net_size[1]) % multiple
        x = F.pad(x, (0, pad_x, 0, pad_y))
        x = x.unsqueeze(1)
        if cfg.validity_channel:
            x = torch.cat([x, (x != 0).to(x.dtype)], 1)
        feats, images = [x], [x[:, 0]]
        for stage in self.encoder:
            feats.append(stage(feats[-1]))
            images.append(F.avg_pool3d(images[-1].unsqueeze(1), (1, 2, 2)).squeeze(1))
        level = cfg.levels
        dec, matched = self._with_correlation(feats[level], images[level], level, None)
        flow = self._flow(dec, level, matched)
        for up in self.decoder:
            level -= 1
            flow_up = rescale_torch(flow, tuple(feats[level].shape[-2:]))
            depth_flow = flow_up.unsqueeze(2).expand(-1, -1, cfg.depth, -1, -1)
            skip, matched = self._with_correlation(feats[level], images[level], level, flow_up)
            dec = torch.cat([up(dec), skip, depth_flow], 1)
            flow = flow_up + self._flow(dec, level, matched)
        # back to the (unpadded) network grid, then to the input grid
        out_size = flow.shape[-2:]
        keep_y = round(net_size[0] * out_size[0] / (net_size[0] + pad_y))
        keep_x = round(net_size[1] * out_size[1] / (net_size[1] + pad_x))
        flow = flow[..., :keep_y, :keep_x]
        return rescale_torch(flow, full_size)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def normalize_sections(stack: torch.Tensor) -> torch.Tensor:
    """Standardise each section over its valid (non-zero) pixels; invalid pixels stay 0.

    ``(N, D, H, W)`` -> same shape, float32. A section with no valid pixel stays all zero.
    """
    stack = stack.float()
    valid = (stack != 0).float()
    count = valid.sum((-2, -1), keepdim=True).clamp_min(1.0)
    mean = (stack * valid).sum((-2, -1), keepdim=True) / count
    var = ((stack - mean).square() * valid).sum((-2, -1), keepdim=True) / count
    return (stack - mean) / torch.sqrt(var + 1e-6) * valid


__all__ = [
    "CONFIGS",
    "FAEMReg",
    "FAEMRegConfig",
    "box_sum",
    "depth_head",
    "local_correlation",
    "normalize_sections",
    "parameter_count",
    "patch_correlation",
    "shifted_copies",
    "soft_argmax_flow",
]
