"""Synthetic data with ground truth: an EM-like procedural volume and random section misalignment.

Everything here is a pure function of its arguments and a seed (``np.random.Generator``), numpy in
and out. Arrays are ``z, y, x``; fields follow :mod:`emalign.fields` (``(2, Y, X)`` float32,
channels ``(dy, dx)``, pixels, pull convention ``warped(p) = image(p + u(p))``).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import cKDTree

from emalign import fields
from emalign.errors import EmalignError

__all__ = [
    "ARTIFACTS",
    "CRACK_WIDTH",
    "Misaligned",
    "demo_stack",
    "em_texture",
    "misalign",
    "random_affine",
    "random_smooth_field",
    "tear",
]

ARTIFACTS = ("blank", "low_contrast", "noisy", "crack")
CRACK_WIDTH = 4
"""Rows (px) of the white band a ``"crack"`` artifact leaves across its section."""
_CHUNK = 16  # sections misaligned per batch
_BLOCK = 4  # pixels per block side when tessellating
_CANDIDATES = 10  # nearest seeds examined per block


@dataclass
class _Cells:
    """Seeds of a power (weighted Voronoi) tessellation on a torus, moving linearly with time."""

    start: np.ndarray  # (N, 2) position at t = 0, px
    velocity: np.ndarray  # (N, 2) px per unit of t (one unit = one slice at z_step 1)
    radius: np.ndarray  # (N,) power weight is radius**2: larger cells
    centre: np.ndarray  # (N,) middle of the lifetime, t units
    half_life: np.ndarray  # (N,) half the lifetime (inf: always present)
    level: np.ndarray  # (N,) cytoplasm brightness multiplier

    def weights(self, t: float, cell_size: float) -> np.ndarray:
        """Power weights at time t; NaN where a cell does not exist. A cell grows from a point at birth."""
        s = (t - self.centre) / self.half_life
        envelope = np.clip(1.0 - s * s, 0.0, 1.0)
        w = (self.radius**2 + cell_size**2) * np.sqrt(envelope) - cell_size**2
        return np.where(envelope > 0, w, np.nan)


def _make_cells(rng: np.random.Generator, period: np.ndarray, cell_size: float, span: float) -> _Cells:
    n_permanent = max(2, round(float(np.prod(period)) / cell_size**2))
    half_max = 80.0
    # cells born and dying inside the volume: about one per cell per 400 slices
    n_transient = int(rng.poisson(n_permanent * (span + 2 * half_max) / 400.0))
    n = n_permanent + n_transient
    angle = rng.uniform(0, 2 * np.pi, n)
    speed = rng.uniform(0.2, 0.5, n)
    level = rng.normal(1.0, 0.07, n) * np.where(rng.random(n) < 0.06, 0.7, 1.0)
    centre = np.concatenate([np.full(n_permanent, span / 2), rng.uniform(-half_max, span + half_max, n_transient)])
    half_life = np.concatenate([np.full(n_permanent, np.inf), rng.uniform(20.0, half_max, n_transient)])
    return _Cells(
        start=rng.uniform(0, 1, (n, 2)) * period,
        velocity=speed[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1),
        radius=rng.uniform(0.0, 0.4, n) * cell_size,
        centre=centre,
        half_life=half_life,
        level=level,
    )


def _tessellate(
    cells: _Cells, t: float, cell_size: float, period: np.ndarray, pad: int, wobble: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cell label ``(Y, X)`` and distance to the nearest cell boundary ``(Y, X)`` px at time t.

    The view's pixel ``(y, x)`` sits at ``(y, x) + pad + wobble[:, y, x]`` on the torus of size
    ``period`` (``wobble`` ``(2, Y, X)`` px bends the straight cell walls). Candidates are the
    nearest seeds of each block of pixels. In a power diagram with ``e_k = |p - s_k|**2 - w_k`` a
    point p of cell i lies ``min_j (e_j - e_i) / (2 |s_j - s_i|)`` from the cell's boundary (the
    cell is convex).
    """
    _, ny, nx = wobble.shape
    b = _BLOCK
    weights = cells.weights(t, cell_size)
    alive = np.flatnonzero(np.isfinite(weights))
    pos = np.mod(cells.start[alive] + cells.velocity[alive] * t, period)
    k = min(_CANDIDATES, len(alive))
    nby, nbx = -(-ny // b), -(-nx // b)
    where = wobble + np.mgrid[:ny, :nx] + pad
    where = np.pad(where, ((0, 0), (0, b * nby - ny), (0, b * nbx - nx)), mode="edge")
    where = where.reshape(2, nby, b, nbx, b).transpose(0, 2, 4, 1, 3).reshape(2, b * b, nby * nbx)
    centres = where.mean(axis=1)  # (2, B)
    _, cand = cKDTree(pos, boxsize=period).query(centres.T, k=k)
    cand = cand.T[:, None, :]  # (k, 1, B): candidates first, so that reductions over them are fast
    rel = pos[cand] - centres.T  # (k, 1, B, 2) seeds relative to the block centre, unwrapped on the torus
    rel = (rel - period * np.round(rel / period)).astype(np.float32)
    sy, sx = rel[..., 0], rel[..., 1]
    # pixel offsets (times 2) from the block centre, (2, b*b, B); their squared norm is common to all seeds
    oy, ox = (2 * (where - centres[:, None, :])).astype(np.float32)
    power = sy * sy + sx * sx - weights[alive][cand].astype(np.float32) - oy * sy - ox * sx  # (k, b*b, B)
    lowest = power.min(axis=0)
    label = np.zeros(lowest.shape, dtype=np.int64)
    first_y, first_x = np.zeros_like(lowest), np.zeros_like(lowest)
    for j in range(k):
        chosen = power[j] == lowest
        np.copyto(label, alive[cand[j]], where=chosen)
        np.copyto(first_y, sy[j], where=chosen)
        np.copyto(first_x, sx[j], where=chosen)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = (power - lowest) / (2 * np.sqrt((sy - first_y) ** 2 + (sx - first_x) ** 2))
    dist = np.fmin.reduce(gap, axis=0)  # the cell's own seed gives 0 / 0, ignored

    def image(blocks: np.ndarray) -> np.ndarray:
        return blocks.reshape(b, b, nby, nbx).transpose(2, 0, 3, 1).reshape(b * nby, b * nbx)[:ny, :nx]

    return image(label), image(dist)


def _lifetime_pairs(centre: np.ndarray, half: np.ndarray, z_step: float, nz: int) -> tuple[np.ndarray, np.ndarray]:
    """(object, slice) index pairs for objects alive in ``|z * z_step - centre| < half``."""
    lo = np.clip(np.ceil((centre - half) / z_step), 0, nz)
    hi = np.clip(np.floor((centre + half) / z_step), -1, nz - 1)
    count = np.maximum(hi - lo + 1, 0).astype(np.int64)
    obj = np.repeat(np.arange(len(centre)), count)
    first = np.cumsum(count) - count
    z = lo[obj].astype(np.int64) + np.arange(count.sum()) - first[obj]
    return obj, z


def _organelles(
    rng: np.random.Generator, cells: _Cells, shape: tuple[int, int, int], z_step: float, pad: int, cell_size: float
) -> np.ndarray:
    """Darkness ``(Z, Y, X)`` in [0, 1) of mitochondria (filled ellipses) and vesicles (rings)."""
    nz, ny, nx = shape
    span = (nz - 1) * z_step
    period = np.array([ny + 2 * pad, nx + 2 * pad], dtype=np.float64)
    n_cells = int(np.sum(~np.isfinite(cells.half_life)))
    scale = cell_size / 24.0
    darkness = np.zeros(nz * ny * nx, dtype=np.float32)
    # (alive per cell, half-life range in t units, semi-minor axis range px, elongation range, kind)
    kinds = [(0.35, (20.0, 80.0), (2.2, 3.2), (1.3, 2.6), "mito"), (1.2, (1.0, 3.0), (1.5, 3.0), (1.0, 1.0), "ring")]
    for per_cell, (h_lo, h_hi), (b_lo, b_hi), (e_lo, e_hi), kind in kinds:
        n = int(rng.poisson(per_cell * n_cells * (span + 2 * h_hi) / (h_lo + h_hi)))
        host = rng.integers(0, n_cells, n)
        offset = rng.normal(0, 0.18 * cell_size, (n, 2))
        centre = rng.uniform(-h_hi, span + h_hi, n)
        half = rng.uniform(h_lo, h_hi, n)
        minor = rng.uniform(b_lo, b_hi, n) * scale
        major = minor * rng.uniform(e_lo, e_hi, n)
        angle0 = rng.uniform(0, np.pi, n)
        spin = rng.normal(0, 0.01, n)
        obj, z = _lifetime_pairs(centre, half, z_step, nz)
        t = z * z_step
        pos = np.mod(cells.start[host[obj]] + cells.velocity[host[obj]] * t[:, None] + offset[obj], period) - pad
        radius = int(np.ceil(b_hi * e_hi * scale)) + 3
        seen = np.all((pos > -radius) & (pos < np.array([ny, nx]) + radius), axis=1)
        obj, z, t, pos = obj[seen], z[seen], t[seen], pos[seen]
        env = np.sqrt(np.clip(1 - ((t - centre[obj]) / half[obj]) ** 2, 0, 1)).astype(np.float32)[:, None]
        grid = np.arange(-radius, radius + 1)
        oy, ox = np.repeat(grid, len(grid)), np.tile(grid, len(grid))
        whole = np.round(pos).astype(np.int64)
        iy, ix = whole[:, :1] + oy, whole[:, 1:] + ox
        frac = (pos - whole).astype(np.float32)
        ry, rx = oy.astype(np.float32) - frac[:, :1], ox.astype(np.float32) - frac[:, 1:]
        theta = (angle0[obj] + spin[obj] * t).astype(np.float32)[:, None]
        cos, sin = np.cos(theta), np.sin(theta)
        a = major[obj].astype(np.float32)[:, None] * env + 1e-3
        b = minor[obj].astype(np.float32)[:, None] * env + 1e-3
        # signed distance to the outline, approximately, in px (negative inside)
        edge = (np.hypot((ry * cos + rx * sin) / a, (rx * cos - ry * sin) / b) - 1.0) * b
        rim = np.exp(edge * edge * np.float32(-1 / (2 * 0.6**2)))
        value = 0.4 / (1 + np.exp(edge / np.float32(0.6))) + 0.25 * rim if kind == "mito" else 0.5 * rim
        inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        flat = (z[:, None] * ny + iy) * nx + ix
        np.maximum.at(darkness, flat[inside], value[inside])
    return darkness.reshape(nz, ny, nx)


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], z_step: float) -> np.ndarray:
    """Fine cytoplasm texture ``(Z, Y, X)``, unit variance, AR(1) along z (correlation 3 slices)."""
    rho = float(np.exp(-z_step / 3.0))
    noise = rng.standard_normal(shape, dtype=np.float32)
    for z in range(1, shape[0]):
        noise[z] = rho * noise[z - 1] + np.sqrt(1 - rho**2) * noise[z]
    fine = gaussian_filter(noise, (0, 1.0, 1.0)) * (2 * np.sqrt(np.pi) * 1.0)
    coarse = gaussian_filter(noise, (0, 3.0, 3.0)) * (2 * np.sqrt(np.pi) * 3.0)
    return (fine + coarse) / np.sqrt(2)


def em_texture(
    shape: tuple[int, int, int],
    seed: int = 0,
    cell_size: float = 24.0,
    z_step: float = 1.0,
    membrane: float = 2.0,
    noise: float = 8.0,
    workers: int = 1,
) -> np.ndarray:
    """A procedural EM-like volume, ``(Z, Y, X)`` uint8, aligned (no misalignment).

    Cells of a moving power (weighted Voronoi) tessellation, separated by dark membranes, with grey
    textured cytoplasm, mitochondria (dark ellipses), vesicles (small dark rings), a mild
    large-scale intensity gradient and intensity-dependent (Poisson-like) noise. Structures evolve
    slowly along z like serial sections of ~40 nm: cell centres drift obliquely at 0.2-0.5 px per
    slice (random per-cell directions), cells are born and vanish rarely (growing from/shrinking to
    a point), organelles move with their cell and change size smoothly.

    Args:
        shape: ``(Z, Y, X)`` in voxels.
        seed: random seed; the same seed gives the same volume.
        cell_size: typical cell diameter in px.
        z_step: evolution per slice in units of one ~40 nm slice (4 looks like keeping every 4th slice).
        membrane: full width at half maximum of a membrane, px.
        noise: noise standard deviation at mid-grey, grey levels.
        workers: threads that tessellate sections in parallel (the volume does not depend on it).
    """
    nz, ny, nx = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    pad = int(np.ceil(cell_size))
    period = np.array([ny + 2 * pad, nx + 2 * pad], dtype=np.float64)
    span = max(nz - 1, 0) * z_step
    cells = _make_cells(rng, period, cell_size, span)
    sigma = membrane / (2 * np.sqrt(2 * np.log(2)))
    wobble = [random_smooth_field((ny, nx), 0.1 * cell_size, 0.35 * cell_size, rng) for _ in range(2)]
    base = np.empty((nz, ny, nx), dtype=np.float32)

    def tessellate_section(z: int) -> None:
        phase = 2 * np.pi * z * z_step / 200.0  # the bends of the walls change slowly along z
        bend = np.cos(phase) * wobble[0] + np.sin(phase) * wobble[1]
        label, dist = _tessellate(cells, z * z_step, cell_size, period, pad, bend)
        base[z] = cells.level[label] * (1 - 0.6 * np.exp(-(dist**2) / (2 * sigma**2)))

    with ThreadPoolExecutor(max(1, min(workers, nz))) as pool:
        list(pool.map(tessellate_section, range(nz)))
    texture = _texture(rng, (nz, ny, nx), z_step)
    dark = _organelles(rng, cells, (nz, ny, nx), z_step, pad, cell_size)
    phi = rng.uniform(0, 2 * np.pi) + 0.005 * z_step * np.arange(nz)[:, None, None]
    ramp_y = np.linspace(-0.5, 0.5, ny, dtype=np.float32)[None, :, None]
    ramp_x = np.linspace(-0.5, 0.5, nx, dtype=np.float32)[None, None, :]
    gain = 1 + 0.2 * (ramp_y * np.cos(phi) + ramp_x * np.sin(phi))
    image = 160.0 * base * (1 + 0.06 * texture) * (1 - dark) * gain.astype(np.float32)
    image = gaussian_filter(image, (0, 0.6, 0.6))
    image += noise * np.sqrt(np.maximum(image, 0) / 160.0) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def random_smooth_field(
    shape: tuple[int, int], amplitude: float, correlation_length: float, rng: np.random.Generator
) -> np.ndarray:
    """A smooth random displacement field ``(2, Y, X)`` float32, px.

    Gaussian white noise filtered so that its covariance falls as ``exp(-r**2 / (2 L**2))`` with
    ``L = correlation_length`` px (filter sigma ``L / sqrt(2)``), then scaled so that the RMS of each
    channel over the image is exactly ``amplitude`` px. Long lengths are drawn on a coarse grid
    (spacing ``L / 4``) with margins and interpolated with cubic splines, so the cost does not
    grow with ``L``. Amplitude 0 gives zeros.
    """
    ny, nx = (int(n) for n in shape)
    if amplitude == 0:
        return np.zeros((2, ny, nx), dtype=np.float32)
    spacing = max(1.0, correlation_length / 4.0)
    sigma = correlation_length / np.sqrt(2) / spacing
    margin = int(np.ceil(3 * sigma)) + 2
    coarse_shape = (
        int(np.ceil((ny - 1) / spacing)) + 1 + 2 * margin,
        int(np.ceil((nx - 1) / spacing)) + 1 + 2 * margin,
    )
    coords = np.stack(np.meshgrid(np.arange(ny) / spacing, np.arange(nx) / spacing, indexing="ij")) + margin
    out = np.empty((2, ny, nx), dtype=np.float32)
    for c in range(2):
        coarse = gaussian_filter(rng.standard_normal(coarse_shape), sigma, mode="constant")
        out[c] = map_coordinates(coarse, coords, order=3, mode="nearest")
        out[c] *= amplitude / np.sqrt(np.mean(out[c].astype(np.float64) ** 2))
    return out


def random_affine(
    rng: np.random.Generator,
    shift: float,
    rotation_deg: float,
    scale: float,
    center: tuple[float, float],
    compression: float = 0.0,
) -> np.ndarray:
    """A random affine map ``(2, 3)`` in ``y, x`` order, mapping output ``p`` to input ``q = A p + t``.

    ``q - center = s R(theta) C (p - center) + d``: shift ``d ~ N(0, shift)`` px per axis, rotation
    ``theta ~ N(0, rotation_deg)`` degrees about ``center`` ``(cy, cx)`` px, isotropic scale
    ``s ~ 1 + N(0, scale)``, and ``C = I - compression n n^T`` a scale by exactly ``1 - compression``
    along a direction ``n`` uniform in angle (the knife's path; drawn only when ``compression`` is not 0,
    so the other draws do not change). Use :func:`emalign.fields.affine_field` to turn it into a pull field.
    """
    d = rng.normal(0.0, shift, 2)
    theta = np.deg2rad(rng.normal(0.0, rotation_deg))
    s = 1.0 + rng.normal(0.0, scale)
    a = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if compression:
        phi = rng.uniform(0.0, np.pi)
        n = np.array([np.sin(phi), np.cos(phi)])
        a = a @ (np.eye(2) - compression * np.outer(n, n))
    c = np.asarray(center, dtype=np.float64)
    return np.concatenate([a, (c - a @ c + d)[:, None]], axis=1)


@dataclass
class Misaligned:
    """A misaligned stack with its ground truth.

    Attributes:
        stack: ``(Z, Y, X)`` raw sections, the input's dtype; 0 outside the imaged area.
        fields: ``(Z, 2, Y, X)`` float32 pull fields ``a_z``, px: ``raw_z = fields.warp(true_z, a_z)``,
            i.e. ``raw_z(q) = true_z(q + a_z(q))``. An aligner's pull field ``c_z`` is perfect when
            ``fields.compose(a_z, c_z) == 0`` (it is ``fields.invert(a_z)``).
        flags: one string per section: ``""`` or the artifact applied to it (see :data:`ARTIFACTS`).
    """

    stack: np.ndarray
    fields: np.ndarray
    flags: list[str] = field(default_factory=list)


def _to_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(image), info.min, info.max).astype(dtype)
    return image.astype(dtype)


def tear(section: np.ndarray, field: np.ndarray, rng: np.random.Generator, white: float) -> None:
    """Tear a misaligned section in place, keeping its ground truth exact: a straight crack of
    :data:`CRACK_WIDTH` rows at a random row of the middle half, imaged ``white`` (saturated), and the
    piece below it moved by 3-6 px in a random direction.

    Args:
        section: ``(Y, X)`` float32 raw section, changed in place.
        field: ``(2, Y, X)`` its pull field (``raw(q) = true(q + field(q))``), changed in place: below the
            crack it becomes ``fields.compose(field, jump)``.
        rng: random generator.
        white: the value of the crack's pixels.
    """
    ny = section.shape[0]
    row = int(rng.integers(ny // 4, 3 * ny // 4))
    angle = rng.uniform(0.0, 2 * np.pi)
    jump = rng.uniform(3.0, 6.0) * np.array([np.sin(angle), np.cos(angle)], np.float32)
    constant = np.broadcast_to(jump[:, None, None], field.shape).astype(np.float32)
    below = slice(row + CRACK_WIDTH, None)
    section[below] = fields.warp(section, constant)[below]
    field[:, below] = fields.compose(field, constant)[:, below]
    section[row : row + CRACK_WIDTH] = white


def misalign(
    stack: np.ndarray,
    seed: int = 0,
    shift: float = 15.0,
    rotation_deg: float = 1.0,
    scale: float = 0.01,
    elastic: float = 2.0,
    elastic_length: float = 100.0,
    artifacts: Sequence[str] = (),
    compression: float = 0.0,
) -> Misaligned:
    """Misalign every section of an aligned stack independently, with exact ground truth.

    Section z gets ``a_z = fields.compose(e_z, f_z)``: ``f_z`` the pull field of
    :func:`random_affine` (``shift`` px, ``rotation_deg`` degrees, ``scale``, ``compression`` along a
    random direction per section, about the image centre) and ``e_z`` a :func:`random_smooth_field` (RMS
    ``elastic`` px, correlation length ``elastic_length`` px). The true section is first deformed
    elastically and then placed by the affine map: ``raw_z(q) = true_z(r + e_z(r))`` with
    ``r = q + f_z(q)``. Pixels that come from outside the section are 0.

    Artifacts (each on a different random section, never the first or last; applied after warping,
    inside the imaged area): ``"blank"`` all zeros, ``"low_contrast"`` contrast x0.2 about the
    mean, ``"noisy"`` Gaussian noise with the section's standard deviation, ``"crack"`` a tear
    across the section (:func:`tear`).

    Args:
        stack: ``(Z, Y, X)`` aligned sections, any real dtype (integer dtypes are rounded and clipped).
        seed: random seed.

    Returns:
        :class:`Misaligned` with the raw stack (input dtype), the fields and per-section flags.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise EmalignError(f"misalign wants a (Z, Y, X) stack; got shape {stack.shape}")
    unknown = sorted(set(artifacts) - set(ARTIFACTS))
    if unknown:
        raise EmalignError(f"unknown artifacts {unknown}; choose from {list(ARTIFACTS)}")
    nz, ny, nx = stack.shape
    if len(artifacts) > max(nz - 2, 0):
        raise EmalignError(f"{len(artifacts)} artifacts need at least {len(artifacts) + 2} sections; got {nz}")
    rng = np.random.default_rng(seed)
    center = ((ny - 1) / 2.0, (nx - 1) / 2.0)
    truth = np.empty((nz, 2, ny, nx), dtype=np.float32)
    raw = np.empty((nz, ny, nx), dtype=np.float32)
    for start in range(0, nz, _CHUNK):  # torch calls on several sections at once are much cheaper
        part = slice(start, min(start + _CHUNK, nz))
        placed, bent = [], []
        for _ in range(part.stop - part.start):
            placed.append(
                fields.affine_field(random_affine(rng, shift, rotation_deg, scale, center, compression), (ny, nx))
            )
            bent.append(random_smooth_field((ny, nx), elastic, elastic_length, rng))
        a = fields.compose_torch(torch.from_numpy(np.stack(bent)), torch.from_numpy(np.stack(placed)))
        image = torch.from_numpy(np.asarray(stack[part], dtype=np.float32)[:, None])
        truth[part] = a.numpy()
        raw[part] = fields.warp_torch(image, a)[:, 0].numpy()
    flags = [""] * nz
    chosen = rng.choice(np.arange(1, nz - 1), size=len(artifacts), replace=False) if artifacts else []
    for kind, z in zip(artifacts, chosen, strict=True):
        flags[z] = kind
        valid = fields.warp(np.ones((ny, nx), dtype=np.float32), truth[z]) > 0.5
        values = raw[z][valid]
        if kind == "blank":
            raw[z] = 0
        elif kind == "crack":
            white = float(np.iinfo(stack.dtype).max) if np.issubdtype(stack.dtype, np.integer) else float(values.max())
            tear(raw[z], truth[z], rng, white)
        elif kind == "low_contrast":
            raw[z][valid] = values.mean() + 0.2 * (values - values.mean())
        else:
            raw[z][valid] = values + rng.normal(0.0, values.std(), values.shape)
    return Misaligned(stack=_to_dtype(raw, stack.dtype), fields=truth, flags=flags)


DEMO_VOXEL_NM = (40.0, 10.0, 10.0)
"""What :func:`demo_stack` models, ``(z, y, x)`` nm: serial sections of 40 nm imaged at 10 nm pixels (the
network treats its texture as it does FlyEM's 10 nm pixels; z-step 4 of the texture is 40 nm-like)."""


def demo_stack(
    shape: tuple[int, int, int] = (48, 256, 256), seed: int = 0, z_step: float = 4.0
) -> tuple[np.ndarray, Misaligned]:
    """An aligned :func:`em_texture` volume ``(Z, Y, X)`` uint8 and its :func:`misalign` ed copy (defaults)."""
    aligned = em_texture(shape, seed=seed, z_step=z_step)
    return aligned, misalign(aligned, seed=seed)
