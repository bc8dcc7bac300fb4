"""Losses and metrics of the volumetric networks (torch, batched 3D).

Volumes are ``(N, 1, Z, Y, X)``; fields ``(N, 3, Z, Y, X)`` pull fields in voxels
(:mod:`emalign.fields`). Model-specific terms live with their models:
:func:`emalign.volumetric.sdhnet.self_distillation_loss` and
:func:`emalign.volumetric.crd.distillation_loss`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIMILARITIES = ("lncc", "pearson")


def pearson_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - global Pearson correlation`` of each pair (SDHNet/RDN's similarity), mean over the batch."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    r = (a * b).mean(1) / torch.sqrt((a.square().mean(1) + 1e-6) * (b.square().mean(1) + 1e-6))
    return (1 - r).mean()


def lncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """``1 - mean local normalised cross-correlation`` over ``window^3`` boxes (0 = identical up to gain)."""
    a, b = a.float(), b.float()

    def box(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    mean_a, mean_b = box(a), box(b)
    cov = box(a * b) - mean_a * mean_b
    var_a = (box(a * a) - mean_a.square()).clamp_min(0)
    var_b = (box(b * b) - mean_b.square()).clamp_min(0)
    return 1 - (cov / torch.sqrt(var_a * var_b + 1e-5)).mean()


def similarity_loss(kind: str, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """The unsupervised similarity term: ``"lncc"`` (local NCC, window 7) or ``"pearson"`` (global)."""
    if kind == "lncc":
        return lncc_loss(fixed, warped)
    if kind == "pearson":
        return pearson_loss(fixed, warped)
    raise ValueError(f"unknown similarity {kind!r}; expected one of {SIMILARITIES}")


def smoothness(flow: torch.Tensor) -> torch.Tensor:
    """First-order smoothness: half the sum over z, y, x of the mean squared forward difference (vox^2/vox^2)."""
    flow = flow.float()
    return 0.5 * sum(flow.diff(dim=d).square().mean() for d in (2, 3, 4))


def endpoint_error(pred: torch.Tensor, target: torch.Tensor, margin: int = 0) -> torch.Tensor:
    """Mean Euclidean distance between two fields (voxels), ignoring ``margin`` voxels at each face."""
    if margin:
        sl = (slice(None), slice(None), *[slice(margin, -margin)] * 3)
        pred, target = pred[sl], target[sl]
    return torch.sqrt((pred.float() - target.float()).square().sum(1) + 1e-12).mean()


def soft_dice_loss(warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean soft Dice`` of one-hot label maps ``(N, K, Z, Y, X)`` (the warped ones trilinearly interpolated).

    A differentiable training term; report Dice with nearest-neighbour warped labels
    (:func:`dice_scores`).
    """
    dims = (2, 3, 4)
    inter = (warped * target).sum(dims)
    total = warped.sum(dims) + target.sum(dims)
    return 1 - ((2 * inter + 1e-5) / (total + 1e-5)).mean()


def one_hot(labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(N, 1, Z, Y, X)`` integer labels -> ``(N, K, Z, Y, X)`` float masks of the given label ids."""
    return (labels == ids.view(1, -1, 1, 1, 1)).float()


def dice_scores(a: np.ndarray, b: np.ndarray, ids: np.ndarray | None = None, largest: int = 50) -> dict[int, float]:
    """Dice of each label between two label volumes (nearest-neighbour warped, never interpolated).

    ``ids``: the labels to score (default: the ``largest`` labels of ``b`` by volume, 0 excluded,
    as the papers score the largest neuron labels). Labels absent from both are skipped.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if ids is None:
        values, counts = np.unique(b[b != 0], return_counts=True)
        ids = values[np.argsort(counts)[::-1][:largest]]
    scores = {}
    for label in ids:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum() + in_b.sum())
        if total:
            scores[int(label)] = 2.0 * float(np.logical_and(in_a, in_b).sum()) / total
    return scores


def mean_dice(a: np.ndarray, b: np.ndarray, ids: np.ndarray | None = None, largest: int = 50) -> float:
    """Mean of :func:`dice_scores` (nan when no label is present)."""
    scores = dice_scores(a, b, ids, largest)
    return float(np.mean(list(scores.values()))) if scores else float("nan")
