"""Training and test data for 3D registration: volumes, known smooth deformations, (fixed, moving) pairs.

A pair is cut from an aligned volume (a FlyEM FIB-SEM block or a procedural one): a block ``B``
with a margin, a random smooth field ``g`` (affine + elastic, voxels) on it, then
``fixed = warp(B, g)`` and ``moving = B``, both cropped to the inner region. So
``fixed(p) = moving(p + g(p))``: ``g`` is exactly the pull field that registers ``moving`` onto
``fixed`` (the ground truth), and near the faces the fixed volume shows real content from the
margin (not zeros). Labels, when given, are warped by nearest neighbour.

Intensities are standardised float32 (zero mean, unit variance: :func:`normalise`); arrays ``(Z, Y, X)``; fields
``(3, Z, Y, X)`` with channels ``(dz, dy, dx)``, pull convention (:mod:`emalign.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from emalign.fields import warp_torch
from emalign.shared_data import FLYEM, SHARED_DATA

__all__ = [
    "DeformationSpec",
    "Intensity",
    "Pair",
    "cells_volume",
    "flyem_volume",
    "intensity_stats",
    "make_pair",
    "make_pairs",
    "normalise",
    "random_affine_3d",
    "random_deformation",
    "random_smooth_field_3d",
]


@dataclass(frozen=True)
class DeformationSpec:
    """How strong the random deformations are (voxels, degrees).

    Attributes:
        shift: standard deviation of the translation per axis, voxels.
        rotation: standard deviation of the rotation angle about each axis, degrees.
        scale: standard deviation of the (isotropic) scale change.
        elastic: RMS per channel of the elastic part, voxels.
        correlation: correlation length of the elastic part, voxels.
        jitter: each pair's strength is multiplied by a factor uniform in ``[1 - jitter, 1 + jitter]``.
    """

    shift: float = 2.0
    rotation: float = 2.0
    scale: float = 0.02
    elastic: float = 2.0
    correlation: float = 14.0
    jitter: float = 0.5


@dataclass(frozen=True)
class Intensity:
    """Robust standardisation of a volume: clip to percentiles, then zero mean and unit variance.

    The networks see standardised volumes (the same statistics for every patch of a volume);
    measured: with inputs in ``[0, 1]`` instead, the small networks barely learn in the first
    few hundred steps.
    """

    low: float
    high: float
    mean: float
    std: float

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """``(clip(volume, low, high) - mean) / std`` as float32."""
        clipped = np.clip(np.asarray(volume, np.float32), self.low, self.high)
        return ((clipped - self.mean) / self.std).astype(np.float32)


def intensity_stats(volume, low: float = 0.5, high: float = 99.5, voxels: float = 2e6) -> Intensity:
    """:class:`Intensity` of a (possibly lazy: dask, Zarr) ``(Z, Y, X)`` volume from a strided subsample."""
    step = max(1, int(np.ceil((float(np.prod(volume.shape)) / voxels) ** (1 / 3))))
    sample = np.asarray(volume[::step, ::step, ::step], dtype=np.float32)
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    hi = max(hi, lo + 1e-6)
    clipped = np.clip(sample, lo, hi)
    return Intensity(lo, hi, float(clipped.mean()), float(max(clipped.std(), 1e-6)))


def normalise(volume: np.ndarray) -> np.ndarray:
    """The standardised volume (:class:`Intensity`), float32."""
    return intensity_stats(volume).apply(volume)


def random_smooth_field_3d(
    shape: tuple[int, int, int], amplitude: float, correlation: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth random field ``(3, Z, Y, X)`` float32, RMS ``amplitude`` voxels per channel.

    White noise on a coarse grid (spacing ``correlation / 4``) is Gaussian-filtered with sigma
    ``correlation / sqrt(2)`` (so the covariance falls as ``exp(-r^2 / (2 correlation^2))``, as in
    :func:`emalign.synth.random_smooth_field`) and trilinearly interpolated to ``shape``.
    """
    shape = tuple(int(n) for n in shape)
    if amplitude == 0:
        return np.zeros((3, *shape), np.float32)
    spacing = max(1.0, correlation / 4.0)
    sigma = correlation / np.sqrt(2) / spacing  # in coarse steps
    radius = int(np.ceil(3 * sigma))
    margin = radius
    coarse = [int(np.ceil((n - 1) / spacing)) + 1 + 2 * margin for n in shape]
    noise = torch.from_numpy(rng.standard_normal((1, 3, *coarse)).astype(np.float32))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    for axis in range(3):
        kernel = taps.view(1, 1, *[-1 if a == axis else 1 for a in range(3)]).repeat(3, 1, 1, 1, 1)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        noise = F.conv3d(F.pad(noise, pad, mode="replicate"), kernel, groups=3)
    coords = [torch.arange(n, dtype=torch.float32) / spacing + margin for n in shape]
    grid = torch.stack(torch.meshgrid(*coords, indexing="ij"))
    scale = torch.tensor([2.0 / (n - 1) for n in coarse]).view(3, 1, 1, 1)
    grid = (grid * scale - 1).permute(1, 2, 3, 0).flip(-1).unsqueeze(0)
    field = F.grid_sample(noise, grid, mode="bilinear", align_corners=True)[0]
    rms = field.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    return (field / rms * amplitude).numpy().astype(np.float32)


def random_affine_3d(
    rng: np.random.Generator, shift: float, rotation: float, scale: float, centre: np.ndarray
) -> np.ndarray:
    """A random affine ``(3, 4)`` in ``z, y, x`` order mapping output ``p`` to input ``A (p - c) + c + t``."""
    angles = np.deg2rad(rng.normal(0.0, rotation, 3))
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(angle)
        r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
        rot = r @ rot
    a = (1.0 + rng.normal(0.0, scale)) * rot
    t = rng.normal(0.0, shift, 3)
    centre = np.asarray(centre, np.float64)
    return np.concatenate([a, (centre - a @ centre + t)[:, None]], axis=1)


def random_deformation(shape: tuple[int, int, int], spec: DeformationSpec, rng: np.random.Generator) -> np.ndarray:
    """A random pull field ``(3, *shape)`` float32, voxels: affine about the centre plus elastic."""
    k = 1.0 + rng.uniform(-spec.jitter, spec.jitter)
    centre = (np.asarray(shape, np.float64) - 1) / 2
    matrix = random_affine_3d(rng, k * spec.shift, k * spec.rotation, k * spec.scale, centre)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")).reshape(3, -1)
    affine = (matrix[:, :3] @ coords + matrix[:, 3:] - coords).reshape(3, *shape).astype(np.float32)
    return affine + random_smooth_field_3d(shape, k * spec.elastic, spec.correlation, rng)


@dataclass
class Pair:
    """A (fixed, moving) pair with its ground-truth pull field (``warp(moving, field) ~ fixed``).

    Attributes:
        fixed, moving: ``(Z, Y, X)`` float32, standardised (:func:`normalise`).
        field: ``(3, Z, Y, X)`` float32, voxels.
        fixed_labels, moving_labels: ``(Z, Y, X)`` int32 label volumes, or None.
    """

    fixed: np.ndarray
    moving: np.ndarray
    field: np.ndarray
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None


def _augment(block: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator):
    """Random axis permutation and flips (the volumes are isotropic)."""
    perm = rng.permutation(3)
    flips = rng.random(3) < 0.5
    out = []
    for arr in (block, labels):
        if arr is not None:
            arr = np.transpose(arr, perm)
            arr = arr[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
            arr = np.ascontiguousarray(arr)
        out.append(arr)
    return out


def make_pair(
    volume: np.ndarray,
    size: int | tuple[int, int, int],
    rng: np.random.Generator,
    spec: DeformationSpec = DeformationSpec(),
    labels: np.ndarray | None = None,
    noise: float = 0.1,
    augment: bool = True,
    margin: int | None = None,
) -> Pair:
    """A random pair from an aligned, standardised volume ``(Z, Y, X)`` (:func:`normalise`).

    Args:
        volume: the source volume (at least ``size + 2 margin`` along each axis).
        size: the pair's shape.
        rng: random generator (location, deformation, augmentation, noise).
        spec: deformation strength.
        labels: optional label volume of the same shape (warped by nearest neighbour).
        noise: standard deviation of independent Gaussian noise added to each volume (in units
            of the volume's standard deviation), plus a random gain (5 %) and offset (0.1).
        augment: random axis permutation and flips.
        margin: context around the block (default: enough for the deformation, 8 + 3 x shift).
    """
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    margin = int(8 + 3 * spec.shift) if margin is None else margin
    big = [n + 2 * margin for n in size]
    if any(b > n for b, n in zip(big, volume.shape, strict=True)):
        raise ValueError(f"volume {volume.shape} is too small for pairs of {size} with margin {margin}")
    start = [int(rng.integers(0, n - b + 1)) for n, b in zip(volume.shape, big, strict=True)]
    box = tuple(slice(s, s + b) for s, b in zip(start, big, strict=True))
    block = np.asarray(volume[box], np.float32)
    lab = None if labels is None else np.asarray(labels[box])
    if augment:
        block, lab = _augment(block, lab, rng)
    g = random_deformation(tuple(big), spec, rng)
    inner = tuple(slice(margin, margin + n) for n in size)
    gt = torch.from_numpy(g).unsqueeze(0)
    fixed = warp_torch(torch.from_numpy(block)[None, None], gt)[0, 0].numpy()[inner]
    moving = block[inner]
    fixed_labels = moving_labels = None
    if lab is not None:
        lab_t = torch.from_numpy(lab.astype(np.float32))[None, None]
        fixed_labels = warp_torch(lab_t, gt, mode="nearest")[0, 0].numpy()[inner].round().astype(np.int32)
        moving_labels = lab[inner].astype(np.int32)

    def corrupt(x: np.ndarray) -> np.ndarray:
        x = x * rng.uniform(0.95, 1.05) + rng.uniform(-0.1, 0.1)
        return (x + noise * rng.standard_normal(x.shape)).astype(np.float32)

    truth = np.ascontiguousarray(g[(slice(None), *inner)])
    return Pair(corrupt(fixed), corrupt(moving), truth, fixed_labels, moving_labels)


def make_pairs(
    volume: np.ndarray, count: int, size: int, seed: int, spec: DeformationSpec = DeformationSpec(), **kwargs
) -> list[Pair]:
    """``count`` reproducible pairs (see :func:`make_pair`)."""
    rng = np.random.default_rng(seed)
    return [make_pair(volume, size, rng, spec, **kwargs) for _ in range(count)]


def cells_volume(
    shape: tuple[int, int, int], seed: int = 0, cell_size: float = 14.0, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """A procedural EM-like volume with its labels: 3D cells with dark membranes, organelles and noise.

    Cells are the Voronoi regions of random seeds (anisotropically stretched along a random axis,
    like neurites); the membrane darkens voxels near the boundary between the two nearest seeds;
    dark blobs stand for mitochondria; cytoplasm is textured; Gaussian noise on top.

    Returns:
        ``image`` ``(Z, Y, X)`` uint8 and ``labels`` ``(Z, Y, X)`` int32 (cell ids from 1).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in shape)
    volume = float(np.prod(shape))
    count = max(2, int(volume / cell_size**3 * 2.0))
    stretch = np.ones(3)
    stretch[rng.integers(3)] = 0.5
    seeds = rng.uniform(0, 1, (count, 3)) * np.asarray(shape)
    tree = cKDTree(seeds * stretch)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    dist, idx = tree.query(coords.reshape(-1, 3) * stretch, k=2)
    labels = (idx[:, 0] + 1).reshape(shape).astype(np.int32)
    # distance to the bisector between the two nearest seeds, in stretched voxels
    a, b = seeds[idx[:, 0]] * stretch, seeds[idx[:, 1]] * stretch
    edge = ((dist[:, 1] ** 2 - dist[:, 0] ** 2) / (2 * np.linalg.norm(a - b, axis=1) + 1e-6)).reshape(shape)
    level = rng.uniform(0.55, 0.8, count + 1)[labels]
    image = level * (1 - 0.65 * np.exp(-(edge**2) / (2 * 0.9**2)))
    texture = rng.standard_normal(shape).astype(np.float32)
    texture = F.avg_pool3d(torch.from_numpy(texture)[None, None], 3, 1, 1, count_include_pad=False)[0, 0].numpy()
    image = image * (1 + 0.15 * texture)
    blobs = rng.uniform(0, 1, (count, 3)) * np.asarray(shape)
    radii = rng.uniform(1.5, 3.0, count)
    blob_tree = cKDTree(blobs)
    bdist, bidx = blob_tree.query(coords.reshape(-1, 3), k=1)
    inside = (bdist < radii[bidx]).reshape(shape)
    image = np.where(inside, image * 0.45, image)
    image = image + noise * rng.standard_normal(shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8), labels


def flyem_volume(index: int, data_dir: Path | None = None) -> np.ndarray:
    """FlyEM medulla sample ``index`` (0 or 1; 250^3 uint8, 10 nm isotropic) from ../shared/data.

    Raises FileNotFoundError (with the path) when the shared data is absent.
    """
    import tifffile

    path = (data_dir or SHARED_DATA) / FLYEM[index]
    if not path.exists():
        raise FileNotFoundError(f"{path}: shared FlyEM data not found")
    return tifffile.imread(path)
