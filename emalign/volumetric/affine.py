"""Classical affine 3D registration (the baseline, and an optional pre-alignment for the networks).

Twelve parameters ``u(p) = W (p - c) + t`` (voxels; ``c`` the volume centre) are fitted by Adam on
``1 - global Pearson correlation`` between the fixed volume and the warped moving one, coarse to
fine (downsampling factors 4, 2, 1). Pull convention: ``warp(moving, u) ~ fixed``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from emalign.fields import warp_torch
from emalign.volumetric.losses import pearson_loss


def affine_grid_field(
    w: torch.Tensor, t: torch.Tensor, shape: tuple[int, ...], spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
) -> torch.Tensor:
    """The field ``W (p - c) + t`` ``(1, 3, *shape)`` on a grid whose voxels are ``spacing`` full-res voxels.

    ``W`` and ``t`` act in full-resolution voxels; the values returned are in voxels of this grid.
    """
    s = torch.tensor(spacing, dtype=w.dtype, device=w.device)
    axes = [(torch.arange(n, dtype=w.dtype, device=w.device) - (n - 1) / 2) * s[i] for i, n in enumerate(shape)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)
    return ((w @ grid + t[:, None]) / s[:, None]).view(1, 3, *shape)


def affine_register(
    fixed: np.ndarray,
    moving: np.ndarray,
    factors: tuple[int, ...] = (4, 2, 1),
    iterations: tuple[int, ...] = (150, 80, 40),
    lr: float = 0.02,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit an affine pull field from ``moving`` to ``fixed`` (both ``(Z, Y, X)``, same shape).

    Returns:
        ``matrix`` ``(3, 4)``: ``[I + W | t - W c + ...]`` such that ``q = A p + b`` maps fixed
        voxel ``p`` to moving voxel ``q``; and the field ``(3, Z, Y, X)`` float32 (voxels).
    """
    f = torch.from_numpy(np.ascontiguousarray(fixed, np.float32))[None, None]
    m = torch.from_numpy(np.ascontiguousarray(moving, np.float32))[None, None]
    radius = float(max(fixed.shape)) / 2
    w = torch.zeros(3, 3, requires_grad=True)
    t_scaled = torch.zeros(3, requires_grad=True)  # translation / radius
    for factor, iters in zip(factors, iterations, strict=True):
        size = [max(4, n // factor) for n in fixed.shape]
        spacing = tuple((n - 1) / max(k - 1, 1) for n, k in zip(fixed.shape, size, strict=True))
        f_l = F.interpolate(f, size=size, mode="trilinear", align_corners=True) if factor > 1 else f
        m_l = F.interpolate(m, size=size, mode="trilinear", align_corners=True) if factor > 1 else m
        optimizer = torch.optim.Adam([w, t_scaled], lr=lr / factor**0.5)
        for _ in range(iters):
            optimizer.zero_grad()
            field = affine_grid_field(w, t_scaled * radius, tuple(size), spacing)
            loss = pearson_loss(f_l, warp_torch(m_l, field))
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        field = affine_grid_field(w, t_scaled * radius, tuple(fixed.shape))[0].numpy()
        a = np.eye(3) + w.numpy().astype(np.float64)
        centre = (np.asarray(fixed.shape, np.float64) - 1) / 2
        b = centre - a @ centre + t_scaled.numpy() * radius
    return np.concatenate([a, b[:, None]], axis=1), field.astype(np.float32)
