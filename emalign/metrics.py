"""Alignment accuracy against known ground truth, as defined in docs/EVALUATION.md.

Fields follow :mod:`emalign.fields`: ``(Z, 2, Y, X)`` float32 stacks of pull fields, channels
``(dy, dx)``, pixels. The ground truth ``a_z`` made the raw stack (``raw_z = warp(true_z, a_z)``),
an aligner's estimate ``c_z`` makes the aligned one (``aligned_z = warp(raw_z, c_z)``); the residual
``R_z = compose(a_z, c_z)`` gives ``aligned_z(p) = true_z(p + R_z(p))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from emalign import fields
from emalign.errors import EmalignError

__all__ = [
    "adjacent_correlation",
    "alignment_metrics",
    "format_metrics",
    "interior",
    "residual_fields",
    "residual_parts",
]


def _check_stack(name: str, array: np.ndarray) -> None:
    if array.ndim != 4 or array.shape[1] != 2:
        raise EmalignError(f"{name} must be a (Z, 2, Y, X) stack of fields; got shape {array.shape}")


def residual_fields(truth: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Residual pull fields ``R_z = compose(a_z, c_z)``, ``(Z, 2, Y, X)`` float32 px.

    Args:
        truth: ``(Z, 2, Y, X)`` ground-truth misalignment ``a_z`` (``raw_z = warp(true_z, a_z)``).
        estimate: ``(Z, 2, Y, X)`` the aligner's fields ``c_z`` (``aligned_z = warp(raw_z, c_z)``).

    Returns:
        ``R_z`` with ``aligned_z(p) = true_z(p + R_z(p))``; zero for a perfect aligner.
    """
    truth, estimate = np.asarray(truth, dtype=np.float32), np.asarray(estimate, dtype=np.float32)
    _check_stack("truth", truth)
    if estimate.shape != truth.shape:
        raise EmalignError(f"estimate shape {estimate.shape} != truth shape {truth.shape}")
    return fields.compose_torch(torch.from_numpy(truth), torch.from_numpy(estimate)).numpy()


def interior(array: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """``array (..., Y, X)`` without ``margin`` of Y and of X on each side (a view): where residuals are measured."""
    ny, nx = array.shape[-2:]
    my, mx = int(round(margin * ny)), int(round(margin * nx))
    return array[..., my : ny - my, mx : nx - mx]


def imaged(truth: np.ndarray) -> np.ndarray:
    """Where each section was imaged: ``(Z, Y, X)`` bool over the true frame, True where the true section's pixel
    lies inside its raw section (``truth``: ``(Z, 2, Y, X)`` misalignment ``a_z``, see :func:`residual_fields`).

    A raw section shifted or turned against the frame leaves part of the frame without data; no aligner can place
    content that was never imaged, so :func:`alignment_metrics` can leave those pixels out.
    """
    _check_stack("truth", np.asarray(truth))
    out = np.empty((len(truth), *np.shape(truth)[2:]), bool)
    for z, a in enumerate(truth):
        inverse = fields.invert(np.asarray(a, dtype=np.float32))  # q = p + w(p) has q + a(q) = p
        out[z] = fields.warp(np.ones(a.shape[1:], np.float32), inverse) > 0.5
    return out


def alignment_metrics(
    residuals: np.ndarray,
    margin: float = 0.1,
    fail_px: float = 25.0,
    estimate: np.ndarray | None = None,
    exclude: Sequence[int] = (),
    seen: np.ndarray | None = None,
) -> dict[str, float]:
    """Accuracy of an alignment from its residual fields (see :func:`residual_fields`).

    Sections in ``exclude`` (e.g. blank ones) are left out; neighbours across them count as
    adjacent. The interior (``margin`` of Y and X cut on each side) of the kept sections is
    measured, where given only on the pixels each section imaged (``seen``, e.g. :func:`imaged`; ``adj`` on
    those both sections of a pair imaged). Harmless parts are removed first: the field shared by all
    sections (per-pixel mean over z of the sections that imaged it) and a whole-stack shear (per channel,
    the least-squares line ``a + b z`` through the per-section mean residual: after removing the shared
    field ``a`` is 0, and ``b z`` is removed).

    Args:
        residuals: ``(Z, 2, Y, X)`` px.
        margin: fraction of Y and X cut on each side.
        fail_px: a pixel fails where its residual (after the removals) exceeds this, px.
        estimate: ``(Z, 2, Y, X)`` the aligner's fields, for ``fold``; None gives fold 0.
        exclude: section indices left out.
        seen: ``(Z, Y, X)`` bool, the pixels measured; None: all.

    Returns:
        ``rms`` px, RMS of the rest; ``adj`` px, RMS of ``R_z - R_{z-1}``; ``drift`` px, RMS over z of
        the per-section mean residual; ``fail`` fraction (0-1) of measured interior pixels with ``|R| >
        fail_px``; ``fold`` mean % over kept sections of the estimate's grid points with Jacobian
        determinant <= 0; ``slope`` px per section, slope of a line fitted to the per-section RMS
        residual against z (near 0 when the error does not grow with z).
    """
    residuals = np.asarray(residuals)
    _check_stack("residuals", residuals)
    nz = len(residuals)
    if estimate is not None and np.shape(estimate) != residuals.shape:
        raise EmalignError(f"estimate shape {np.shape(estimate)} != residuals shape {residuals.shape}")
    if seen is not None and np.shape(seen) != (nz, *residuals.shape[2:]):
        raise EmalignError(f"seen shape {np.shape(seen)} != the residuals' sections {(nz, *residuals.shape[2:])}")
    keep = np.setdiff1d(np.arange(nz), np.asarray(exclude, dtype=np.int64))
    if len(keep) == 0:
        raise EmalignError(f"all {nz} sections are excluded")
    rest = interior(residuals, margin)[keep].astype(np.float32)
    measured = np.ones((nz, *residuals.shape[2:]), bool) if seen is None else np.asarray(seen, bool)
    mask = interior(measured, margin)[keep]
    if not mask.any():
        raise EmalignError("no pixel of the interior was imaged: nothing to measure")
    weight = mask[:, None]  # bool: products stay float32, sums are float64
    rest -= (np.sum(rest * weight, axis=0, dtype=np.float64) / np.maximum(weight.sum(axis=0), 1)).astype(np.float32)
    z = keep.astype(np.float64)
    zc = z - z.mean()
    means = np.sum(rest * weight, axis=(2, 3), dtype=np.float64) / np.maximum(weight.sum(axis=(2, 3)), 1)  # (K, 2)
    slope_yx = zc @ means / (zc @ zc) if len(keep) > 1 else np.zeros(2)
    rest -= (zc[:, None] * slope_yx).astype(np.float32)[:, :, None, None]
    means -= zc[:, None] * slope_yx
    squared = np.sum(rest**2, axis=1)  # (K, y, x)
    per_section = np.sqrt(np.sum(squared * mask, axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1))
    both = mask[1:] & mask[:-1]
    adjacent = np.sum((rest[1:] - rest[:-1]) ** 2, axis=1)[both].mean(dtype=np.float64) if both.any() else 0.0
    return {
        "rms": float(np.sqrt(squared[mask].mean(dtype=np.float64))),
        "adj": float(np.sqrt(adjacent)),
        "drift": float(np.sqrt(np.mean(np.sum(means**2, axis=1)))),
        "fail": float(np.mean(squared[mask] > fail_px**2)),
        "fold": float(np.mean([fields.folding_percent(estimate[z]) for z in keep])) if estimate is not None else 0.0,
        "slope": float(np.polyfit(z, per_section, 1)[0]) if len(keep) > 1 else 0.0,
    }


def residual_parts(residuals: np.ndarray, margin: float = 0.1) -> dict[str, float]:
    """Where a residual lies: RMS (px) of each section's translation, of the rest of its best-fit affine map
    (rotation, scale, shear) and of the non-affine rest.

    Measured like :func:`alignment_metrics`: on the interior (``margin`` of Y and X cut on each side), after
    removing the field shared by all sections (no whole-stack shear removed). The three parts are orthogonal:
    their squares add up to the squared RMS of the rest.

    Args:
        residuals: ``(Z, 2, Y, X)`` px (residual fields, or any per-section fields such as a misalignment).

    Returns:
        ``{"translation": px, "linear": px, "non-affine": px}``.
    """
    residuals = np.asarray(residuals)
    _check_stack("residuals", residuals)
    rest = interior(residuals, margin).astype(np.float64)
    rest -= rest.mean(axis=0)
    depth, _, height, width = rest.shape
    yy, xx = np.mgrid[0:height, 0:width]
    design = np.stack([np.ones(height * width), yy.ravel() / height, xx.ravel() / width], axis=1)
    samples = rest.reshape(depth * 2, height * width).T  # one column per section and channel
    affine = (design @ np.linalg.lstsq(design, samples, rcond=None)[0]).T.reshape(rest.shape)
    translation = np.broadcast_to(rest.mean(axis=(2, 3), keepdims=True), rest.shape)

    def rms(part: np.ndarray) -> float:
        return float(np.sqrt(np.mean(np.sum(part**2, axis=1))))

    return {"translation": rms(translation), "linear": rms(affine - translation), "non-affine": rms(rest - affine)}


def format_metrics(d: dict[str, float]) -> str:
    """The metrics of :func:`alignment_metrics` on one line.

    E.g. ``rms 1.23 px | adj 0.98 px | drift 0.40 px | fail 0.0% | fold 0.00% | slope +0.001 px/section``.
    """
    return (
        f"rms {d['rms']:.2f} px | adj {d['adj']:.2f} px | drift {d['drift']:.2f} px | "
        f"fail {100 * d['fail']:.1f}% | fold {d['fold']:.2f}% | slope {d['slope']:+.3f} px/section"
    )


def adjacent_correlation(stack: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation of each section with the previous one, ``(Z - 1,)`` float64.

    Entry ``z - 1`` compares sections ``z - 1`` and ``z`` on the pixels valid in both: nonzero
    pixels, or where ``mask`` (``(Z, Y, X)`` or ``(Y, X)``, truthy = valid) is set. NaN where fewer
    than 2 pixels are valid or a section is constant there (e.g. blank).
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise EmalignError(f"adjacent_correlation wants a (Z, Y, X) stack; got shape {stack.shape}")
    valid = stack != 0 if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), stack.shape)
    out = np.full(max(stack.shape[0] - 1, 0), np.nan)
    for z in range(1, stack.shape[0]):
        both = valid[z] & valid[z - 1]
        if both.sum() < 2:
            continue
        a = stack[z - 1][both].astype(np.float64)
        b = stack[z][both].astype(np.float64)
        a -= a.mean()
        b -= b.mean()
        norm = np.sqrt((a @ a) * (b @ b))
        if norm > 0:
            out[z - 1] = (a @ b) / norm
    return out
