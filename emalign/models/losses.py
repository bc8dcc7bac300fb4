"""Losses for the serial registration networks (torch, batched, masked).

Images are ``(N, 1, H, W)`` or ``(N, H, W)``; fields ``(N, 2, H, W)`` in pixels (pull
convention, see :mod:`emalign.fields`); masks are 1 where a pixel is valid (imaged,
not blank or padded) and 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from emalign.consensus import PAPER_REFERENCE_WEIGHTS


def _channel(x: torch.Tensor) -> torch.Tensor:
    return x if x.ndim == 4 else x.unsqueeze(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over pixels where ``mask`` is set (all pixels if None)."""
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def local_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, window: int = 9) -> torch.Tensor:
    """``1 - mean local normalised cross-correlation`` of two images (0 = identical up to gain).

    Statistics use a ``window x window`` box; pixels outside ``mask`` neither contribute to
    the windows' statistics nor to the mean.
    """
    a, b = _channel(a), _channel(b)
    m = torch.ones_like(a) if mask is None else _channel(mask).to(a.dtype)
    pad = window // 2

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=True)

    weight = box(m).clamp_min(1e-6)
    mean_a, mean_b = box(a * m) / weight, box(b * m) / weight
    cov = box(a * b * m) / weight - mean_a * mean_b
    var_a = (box(a * a * m) / weight - mean_a**2).clamp_min(0)
    var_b = (box(b * b * m) / weight - mean_b**2).clamp_min(0)
    ncc = cov / torch.sqrt(var_a * var_b + 1e-5)
    valid = m * (weight > 0.5).to(a.dtype)
    return 1.0 - masked_mean(ncc, valid)


def reference_similarity(
    warped: torch.Tensor,
    references: torch.Tensor,
    weights: Sequence[float] = PAPER_REFERENCE_WEIGHTS,
    mask: torch.Tensor | None = None,
    window: int = 9,
) -> torch.Tensor:
    """Distance-weighted local-NCC loss of a warped moving section against its references.

    Args:
        warped: ``(N, H, W)`` warped moving section.
        references: ``(N, R, H, W)``, nearest first (R <= len(weights)); all-zero
            references (blank sections) are skipped.
        weights: weight per reference distance (normalised over the references used).
        mask: ``(N, H, W)`` valid pixels of the warped moving section.
    """
    total = warped.new_zeros(())
    norm = 0.0
    for r in range(references.shape[1]):
        ref = references[:, r]
        ref_mask = (ref != 0).to(warped.dtype)
        if ref_mask.sum() == 0:
            continue
        joint = ref_mask if mask is None else ref_mask * mask
        total = total + weights[r] * local_ncc(warped, ref, joint, window)
        norm += weights[r]
    return total / max(norm, 1e-6)


def smoothness(field: torch.Tensor) -> torch.Tensor:
    """First-order smoothness: mean squared forward difference of the field (px^2 / px^2)."""
    dy = field[:, :, 1:, :] - field[:, :, :-1, :]
    dx = field[:, :, :, 1:] - field[:, :, :, :-1]
    return 0.5 * (dy.square().mean() + dx.square().mean())


def endpoint_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Euclidean distance between two fields (px), over ``mask`` (N, H, W)."""
    epe = torch.sqrt((pred - target).square().sum(1, keepdim=True) + 1e-6)
    return masked_mean(epe, None if mask is None else _channel(mask))
