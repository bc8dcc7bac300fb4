"""Local translations between two sections, patch by patch: a coarse flow field on a grid of nodes.

A section is cut into overlapping square patches whose corners lie on a regular grid; each
patch is a *node*, placed at the patch's centre. A patch is phase-correlated
(:func:`emalign.rigid.correlation_peaks`: windowed, whitened, low-passed, sub-pixel) with
the same patch of another section, which gives per node a pull shift (``moving(p + shift) ~
fixed(p)`` around the node, px) and its correlation peak (``[0, 1]``, the match's
confidence). Shifts are found up to about a third of the patch: meant for sections already
aligned to a few px. Values between nodes are interpolated linearly, constant beyond the
outer nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emalign.rigid import LOWPASS, correlation_peaks, on_device, patch_spectra, soft_mask

__all__ = ["MIN_DATA", "PatchGrid", "patch_starts"]

MIN_DATA = 0.5
"""Smallest fraction of a patch's pixels with data for it to be matched."""


def patch_starts(length: int, size: int, spacing: int) -> np.ndarray:
    """First pixels of patches of ``size`` along an axis of ``length``, spread evenly about ``spacing``
    apart, the first at 0 and the last ending at ``length`` (one patch at 0 when the axis is not longer)."""
    if length <= size:
        return np.zeros(1, int)
    count = max(int(round((length - size) / spacing)), 1) + 1
    return np.linspace(0, length - size, count).round().astype(int)


def _interpolation_matrix(positions: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``(len(positions), len(centres))`` weights of linear interpolation between ``centres`` (clamped)."""
    return np.stack([np.interp(positions, centres, unit) for unit in np.eye(len(centres))], axis=1)


@dataclass(frozen=True)
class PatchGrid:
    """Square patches of ``size`` px, half overlapping, covering a ``(Y, X)`` section.

    Attributes:
        ys, xs: first row and column of the patches (a patch is ``(ys[i], xs[j])`` to ``+ size``).
        size: ``(py, px)`` patch shape (the section's side where it is smaller than the patch).
    """

    ys: np.ndarray
    xs: np.ndarray
    size: tuple[int, int]

    @classmethod
    def for_shape(cls, shape: tuple[int, int], size: int) -> PatchGrid:
        """The grid of ``size`` px patches, spaced ``size // 2``, over a ``shape (Y, X)`` section."""
        patch = (min(size, shape[0]), min(size, shape[1]))
        spacing = max(size // 2, 1)
        return cls(patch_starts(shape[0], patch[0], spacing), patch_starts(shape[1], patch[1], spacing), patch)

    def part(self, rows: slice, cols: slice, origin: tuple[int, int]) -> PatchGrid:
        """The patches ``rows``, ``cols`` of this grid, in the pixels of an image whose corner is ``origin``."""
        return PatchGrid(self.ys[rows] - origin[0], self.xs[cols] - origin[1], self.size)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` nodes."""
        return len(self.ys), len(self.xs)

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Node positions along y and along x, full-resolution px."""
        return self.ys + (self.size[0] - 1) / 2, self.xs + (self.size[1] - 1) / 2

    def spectra(self, image: np.ndarray, ramp: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Whitened spectra of the patches of a ``(Y, X)`` image (zeros are no data), ready for :meth:`match`.

        ``ramp``: of the no-data edges' weights (:func:`emalign.rigid.soft_mask`, on the CPU; default: the
        image's own). The image and its weights are moved to ``device``, where the spectra are computed.

        Returns ``(ny * nx, py, px // 2 + 1)`` complex64 on ``device``; all zero for a patch with data on less
        than :data:`MIN_DATA` of its pixels (its matches, half in the void, would be unreliable).
        """
        weights = soft_mask(image, ramp=ramp)
        cut = [(slice(y, y + self.size[0]), slice(x, x + self.size[1])) for y in self.ys for x in self.xs]
        spectra = patch_spectra(on_device(image, device), on_device(weights, device), cut, LOWPASS)
        spectra[torch.as_tensor([(weights[s] > 0).mean() < MIN_DATA for s in cut], device=device)] = 0
        return spectra

    def match(self, fixed: np.ndarray, moving: np.ndarray, upsample: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Per node, the pull shift of ``moving`` onto ``fixed`` and its correlation peak.

        Args:
            fixed, moving: :meth:`spectra` of two sections, on one device.
            upsample: sub-pixel resolution ``1 / upsample`` px.

        Returns:
            ``(shifts (ny, nx, 2) px (dy, dx), peaks (ny, nx))`` numpy; a patch without data has peak 0.
        """
        shifts, peaks = correlation_peaks(fixed, moving, self.size, upsample)
        return shifts.reshape(*self.shape, 2), peaks.reshape(self.shape)

    def field(self, values: np.ndarray, grid_shape: tuple[int, int], stride: int) -> np.ndarray:
        """Node values ``(C, ny, nx)`` interpolated onto a field grid of ``grid_shape`` and ``stride``.

        Grid sample ``i`` sits at full-resolution ``i * stride`` (:mod:`emalign.pipeline.store`);
        values are bilinear between node centres and constant beyond the outer ones. Returns
        ``(C, gy, gx)`` float32.
        """
        cy, cx = self.centres()
        along_y = _interpolation_matrix(np.arange(grid_shape[0]) * stride, cy)
        along_x = _interpolation_matrix(np.arange(grid_shape[1]) * stride, cx)
        return (along_y @ np.asarray(values, np.float64) @ along_x.T).astype(np.float32)
