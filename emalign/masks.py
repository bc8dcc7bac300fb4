"""Invalid pixels of a section, the pieces a crack or fold cuts it into, and smoothing within a piece.

Conventions: sections are ``(Y, X)`` arrays; a mask is a ``(Y, X)`` bool array, True where a
pixel is *invalid* (no tissue, saturated, featureless, or marked by the user). The rest of
emalign treats 0 as "no data", so invalid pixels are set to 0 before matching. Fields are
``(2, gy, gx)`` pull fields on a grid of stride ``s`` (see :mod:`emalign.fields`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TEXTURE_BLOCK = 32
"""Side (px) of the blocks whose contrast decides whether an area is featureless."""
TEXTURE_FRACTION = 0.1
"""A block is featureless below this fraction of the section's median block contrast."""
MIN_PIECE = 0.05
"""Pieces smaller than this fraction of the section are not estimated on their own."""


def _block_std(section: np.ndarray, block: int) -> np.ndarray:
    """Standard deviation of every ``block x block`` tile (partial tiles at the edges included), upsampled back."""
    height, width = section.shape
    pad = ((0, -height % block), (0, -width % block))
    tiles = np.pad(section.astype(np.float32), pad, mode="edge")
    tiles = tiles.reshape(tiles.shape[0] // block, block, tiles.shape[1] // block, block)
    std = tiles.std(axis=(1, 3))
    return np.repeat(np.repeat(std, block, 0), block, 1)[:height, :width]


def invalid_pixels(section: np.ndarray, user: np.ndarray | None = None) -> np.ndarray:
    """``(Y, X)`` bool: pixels that must not drive the alignment.

    Detected: no data (0), saturated areas (the integer dtype's maximum, in runs of more than a
    few pixels: cracks and holes imaged as white), and featureless blocks (contrast below
    :data:`TEXTURE_FRACTION` of the section's median block contrast: charging, blur, empty
    resin). ``user``: a mask of the same shape, non-zero where invalid.
    """
    invalid = section == 0
    if section.dtype.kind in "ui":
        saturated = section == np.iinfo(section.dtype).max
        if saturated.any():
            invalid |= ndimage.binary_opening(saturated, np.ones((3, 3), bool))
    std = _block_std(section, TEXTURE_BLOCK)
    typical = np.median(std[~invalid]) if (~invalid).any() else 0.0
    if typical > 0:
        invalid |= std < TEXTURE_FRACTION * typical
    if user is not None:
        invalid |= np.asarray(user) != 0
    return invalid


def pieces(valid: np.ndarray, min_fraction: float = MIN_PIECE) -> tuple[np.ndarray, int]:
    """The connected pieces of a section's valid pixels that are large enough to align on their own.

    Returns ``(labels (Y, X) int, count)``: labels ``1..count`` largest first, 0 for invalid
    pixels and for pieces under ``min_fraction`` of the section.
    """
    labels, count = ndimage.label(valid)
    if count == 0:
        return labels, 0
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    keep = [i + 1 for i in np.argsort(-sizes) if sizes[i] >= min_fraction * valid.size]
    relabel = np.zeros(count + 1, labels.dtype)
    relabel[keep] = np.arange(1, len(keep) + 1)
    return relabel[labels], len(keep)


def smooth_within(field: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of ``field (2, gy, gx)`` that only mixes values where ``weight (gy, gx) > 0``.

    Normalised convolution: ``G * (w f) / G * w``; where no weighted value is within reach the
    result is 0. ``sigma`` in grid cells (0: ``field`` where weighted, else 0).
    """
    weight = np.asarray(weight, np.float32)
    if sigma <= 0:
        return field * (weight > 0)
    numerator = ndimage.gaussian_filter(field * weight, (0, sigma, sigma), mode="constant")
    denominator = ndimage.gaussian_filter(weight, sigma, mode="constant")
    return np.where(denominator > 1e-6, numerator / np.maximum(denominator, 1e-6), 0.0).astype(np.float32)


def piecewise_field(fields: list[np.ndarray], labels: np.ndarray, stride: int, sigma: float) -> np.ndarray:
    """One ``(2, gy, gx)`` field from one full-resolution estimate per piece, never smoothed across pieces.

    ``fields[i]`` is the ``(2, Y, X)`` estimate of piece ``i + 1`` of ``labels`` (see :func:`pieces`);
    each is subsampled at ``stride`` and smoothed within its piece (``sigma`` px). Grid points in
    no piece (the crack itself, small fragments) take the value of the nearest piece, so the field
    jumps from one piece's value to the other's within the crack.
    """
    grid = labels[::stride, ::stride]
    out = np.zeros((2, *grid.shape), np.float32)
    for index, field in enumerate(fields, start=1):
        inside = grid == index
        smoothed = smooth_within(field[:, ::stride, ::stride], inside, sigma / stride)
        out[:, inside] = smoothed[:, inside]
    gaps = grid == 0
    if gaps.any() and not gaps.all():
        _, (rows, cols) = ndimage.distance_transform_edt(gaps, return_indices=True)
        out[:, gaps] = out[:, rows[gaps], cols[gaps]]
    return out


__all__ = ["invalid_pixels", "piecewise_field", "pieces", "smooth_within"]
