"""Downsampling by block means in y and x.

An image ``(..., Y, X)`` is cut into ``factor x factor`` blocks; output pixel ``(i, j)`` is the
mean of input pixels ``factor * i .. factor * i + factor - 1`` (and likewise in x), so its centre
sits at input coordinate ``factor * i + (factor - 1) / 2``. Leading axes are kept as they are.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["block_mean"]


def block_mean(
    image: np.ndarray, factor: int, *, edges: Literal["crop", "pad"] = "crop", nodata: bool = False
) -> np.ndarray:
    """``(..., Y, X)`` -> ``(..., Y', X')`` means of ``factor x factor`` blocks.

    Args:
        image: the pixels, any numeric dtype.
        factor: block side, px (1 gives the pixels themselves, as floats).
        edges: where ``Y`` or ``X`` is not a multiple of ``factor``: ``crop`` drops the last partial
            block (``Y' = Y // factor``); ``pad`` completes it by repeating the last row or column
            (``Y' = ceil(Y / factor)``).
        nodata: zeros are no data: a block's value is the mean of its non-zero pixels, and 0 where
            at most half its pixels have data.

    Returns:
        float32 with ``nodata``, else float64 (summed in float64: exact for 8- and 16-bit integers).
    """
    *lead, height, width = image.shape
    if edges == "pad" and (height % factor or width % factor):
        pad = [(0, 0)] * len(lead) + [(0, -height % factor), (0, -width % factor)]
        image = np.pad(image, pad, mode="edge")
    ny, nx = image.shape[-2] // factor, image.shape[-1] // factor
    blocks = image[..., : ny * factor, : nx * factor]
    if not nodata:
        return blocks.reshape(*lead, ny, factor, nx, factor).mean((-3, -1), dtype=np.float64)
    if factor == 1:
        return np.asarray(image, dtype=np.float32)
    blocks = np.asarray(blocks, dtype=np.float32).reshape(*lead, ny, factor, nx, factor)
    total = blocks.sum(axis=(-3, -1))
    count = (blocks != 0).sum(axis=(-3, -1))
    return np.where(count * 2 > factor * factor, total / np.maximum(count, 1), 0).astype(np.float32)
