"""Overlapping tiles along one axis and their blending weights.

An axis ``[0, length)`` (pixels or sections) is cut into tiles ``[start, start + tile)`` that
overlap their neighbours; the last tile ends at ``length``. A tile's values are weighted by a
taper that ramps linearly up from its start and down to its stop on faces shared with a
neighbour (1 on the axis's own ends), and the weighted sums are divided by the summed weights,
so the tiles leave no seams. Multi-dimensional tiles take the outer product of their axes' tapers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["taper", "tile_starts"]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """First positions of tiles of ``tile`` covering ``[0, length)``, neighbours sharing at least ``overlap``.

    Tiles start every ``tile - overlap`` (at least 1) from 0; the last starts at ``length - tile``.
    An axis no longer than a tile has one tile, at 0 (it is then shorter than ``tile``).
    """
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    return [*range(0, length - tile, step), length - tile]


def taper(start: int, stop: int, length: int, ramp: int) -> np.ndarray:
    """``(stop - start,)`` float32 blending weights of the tile ``[start, stop)`` of an axis ``[0, length)``.

    On an inner face (``start > 0``, ``stop < length``) the weights over ``ramp`` positions are
    ``(i + 0.5) / ramp`` for ``i`` counted from the face; elsewhere 1. Where the two faces' ramps
    meet (a tile shorter than ``2 * ramp``) the smaller weight holds.
    """
    size = stop - start
    weights = np.ones(size, np.float32)
    rise = (np.arange(min(ramp, size), dtype=np.float32) + 0.5) / max(ramp, 1)
    if start > 0:
        weights[: rise.size] = np.minimum(weights[: rise.size], rise)
    if stop < length:
        weights[size - rise.size :] = np.minimum(weights[size - rise.size :], rise[::-1])
    return weights
