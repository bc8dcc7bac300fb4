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


def _no_data(section: np.ndarray) -> np.ndarray:
    """``(Y, X)`` bool: no data (0) and saturated runs (the integer dtype's maximum, opened by a 3 x 3 square)."""
    invalid = section == 0
    if section.dtype.kind in "ui":
        saturated = section == np.iinfo(section.dtype).max
        if saturated.any():
            invalid |= ndimage.binary_opening(saturated, np.ones((3, 3), bool))
    return invalid


def invalid_pixels(
    section: np.ndarray, user: np.ndarray | None = None, typical: np.floating | None = None
) -> np.ndarray:
    """``(Y, X)`` bool: pixels that must not drive the alignment.

    Detected: no data (0), saturated areas (the integer dtype's maximum, in runs of more than a
    few pixels: cracks and holes imaged as white), and featureless blocks (contrast below
    :data:`TEXTURE_FRACTION` of ``typical``: charging, blur, empty resin). ``typical``: the median block
    contrast of the whole section when ``section`` is a part of it (:func:`typical_contrast`); default: the
    median of ``section``'s own. ``user``: a mask of the same shape, non-zero where invalid.
    """
    invalid = _no_data(section)
    std = _block_std(section, TEXTURE_BLOCK)
    if typical is None:
        typical = np.median(std[~invalid]) if (~invalid).any() else 0.0
    if typical > 0:
        invalid |= std < TEXTURE_FRACTION * typical
    if user is not None:
        invalid |= np.asarray(user) != 0
    return invalid


def block_contrast(section: np.ndarray, part: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """``(contrast, count)`` of the blocks of the part ``part`` of ``section`` (which holds the part and what
    surrounds it, so saturated runs are judged as in the whole section), both ``(ceil(h / b), ceil(w / b))`` for
    ``b`` = :data:`TEXTURE_BLOCK`: each block's contrast and its number of pixels with data (not no data or
    saturated); what :func:`typical_contrast` combines over the parts of a section read one at a time (parts cut
    at multiples of the block from the section's corner)."""
    valid = ~_no_data(section)[part]
    block = TEXTURE_BLOCK
    std = _block_std(section[part], block)[::block, ::block]
    pad = ((0, -valid.shape[0] % block), (0, -valid.shape[1] % block))
    count = np.pad(valid, pad).reshape(std.shape[0], block, std.shape[1], block).sum(axis=(1, 3))
    return std, count


def typical_contrast(contrast: np.ndarray, count: np.ndarray) -> np.floating:
    """The median contrast over a section's pixels with data, from its blocks' ``contrast`` and pixel ``count``
    (:func:`block_contrast`): what :func:`invalid_pixels` computes from the whole section (0 without data)."""
    contrast, count = np.ravel(contrast), np.ravel(count)
    total = int(count.sum())
    if total == 0:
        return contrast.dtype.type(0)
    order = np.argsort(contrast, kind="stable")
    ends = np.cumsum(count[order])
    middle = [contrast[order][np.searchsorted(ends, rank, side="right")] for rank in ((total - 1) // 2, total // 2)]
    return np.median(np.array(middle, contrast.dtype))


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


__all__ = [
    "block_contrast",
    "invalid_pixels",
    "piecewise_field",
    "pieces",
    "smooth_within",
    "typical_contrast",
]
