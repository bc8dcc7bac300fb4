"""Classical rigid registration by phase correlation, and a redundant rigid solve for whole stacks.

Conventions (see :mod:`emalign.fields`): arrays are ``z, y, x``; shifts are ``(dy, dx)`` in
pixels; affine maps are ``(2, 3)`` matrices in ``(y, x)`` order mapping *output* coordinates
``p`` to *input* coordinates ``q = A p + t`` (pull): ``aligned(p) = raw(A p + t)``, so
:func:`emalign.fields.affine_field` turns them into pull fields. A rotation by ``a`` degrees
about the image centre ``c = ((Y - 1) / 2, (X - 1) / 2)`` has ``A = [[cos a, -sin a],
[sin a, cos a]]``. Zero pixels are "no data" and never count in matching.

Matching uses phase correlation with a Gaussian low-pass weight on the whitened cross-power
spectrum: sections 40-50 nm apart share only their coarse structure, and pure (flat) phase
correlation then locks onto noise.

Device rule: spectra are torch complex64 tensors on a ``device`` (the CPU by default; a CUDA GPU
with ``device="cuda"``), where the FFTs and the whitening run; images, no-data weights and warps stay
numpy on the CPU and are moved there, and small results (shifts, peaks, angles) come back as numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
import torch
from scipy import ndimage, sparse
from scipy.linalg import solveh_banded
from scipy.sparse.linalg import spsolve

from emalign import fields
from emalign.downsample import block_mean

__all__ = [
    "SECOND_OPINION_MARGIN",
    "RigidEstimate",
    "affine_fields",
    "angle_residuals",
    "angles",
    "centre_shifts",
    "correlation_peaks",
    "estimate_rigid",
    "jitter_and_wander",
    "pairwise_rigid",
    "patch_spectra",
    "phase_correlation",
    "rigid_chain",
    "rigid_matrix",
    "misaligned_slope",
    "pair_sections",
    "soft_mask",
    "solve_rigid",
    "toward",
    "whitened_spectra",
]

LOWPASS = 0.1  # default Gaussian low-pass of the correlation, cycles per pixel of the matched images
_TUKEY_ALPHA = 0.5  # fraction of each axis tapered by the window
_N_ANGLES = 360  # polar samples over 180 degrees of the Fourier magnitude
_MIN_VALID = 0.05  # an image with less valid area than this fraction is blank
_PATCH_GRID = 4  # refinement matches a 4 x 4 grid of half-size patches
REFINE_STEPS = 2  # default Gauss-Newton steps of the patch-based refinement
OFFSET_CLASS_TOLERANCE = 2.0
"""How much larger than the best offset class's a class's typical residual may be in :func:`solve_rigid`
before its pairs are down-weighted."""
SECOND_OPINION_MARGIN = 2.0
"""In :func:`pairwise_rigid`, a pair whose peak is under this multiple of the stack's unrelated-pair peak is
matched again at coarser block means."""
_MIN_SECOND_OPINION_SIDE = 16  # px of the coarser images: below this no second opinion is asked
SECOND_OPINION_SIDE = 512
"""In :func:`pairwise_rigid`, second opinions go on to 4x, 8x, ... coarser block means while these stay at least
this wide (px): matched whole, sections strained by a few % decorrelate at their edges at fine scale, and offsets
of hundreds of px then lock onto noise, while the coarse structure still matches."""
SLOPE_TOLERANCE = 2.0
"""In :func:`misaligned_slope`, a trajectory's slope along z is taken for misalignment up to this many standard
deviations of the slope that its per-section jitter alone would give."""
_CROP = 4  # the sub-pixel peak interpolates the correlation on +-_CROP px around the integer peak


@dataclass
class RigidEstimate:
    """A rigid registration of ``moving`` onto ``fixed``.

    Attributes:
        matrix: ``(2, 3)`` pull affine, full-resolution pixels: ``moving(matrix @ [p, 1]) ~ fixed(p)``.
        angle_deg: rotation about the image centre, degrees.
        shift: ``(dy, dx)`` translation at the image centre, pixels.
        score: phase-correlation peak after alignment, in ``[0, 1]`` (0: blank or unrelated).
    """

    matrix: np.ndarray
    angle_deg: float
    shift: np.ndarray
    score: float


def _rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _centre(shape: Sequence[int]) -> np.ndarray:
    return (np.asarray(shape[-2:], dtype=np.float64) - 1) / 2


def rigid_matrix(angle_deg: float, shift: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """The ``(2, 3)`` pull affine ``q = R (p - c) + c + shift``: a rotation about the centre of ``shape``, then a shift.

    Args:
        angle_deg: rotation in degrees (``R = [[cos, -sin], [sin, cos]]`` in ``(y, x)``).
        shift: ``(dy, dx)`` in pixels.
        shape: ``(Y, X)`` of the image (its centre is the rotation centre).
    """
    rot, centre = _rotation(angle_deg), _centre(shape)
    return np.concatenate([rot, (centre - rot @ centre + np.asarray(shift, dtype=np.float64))[:, None]], axis=1)


def angles(matrices: np.ndarray) -> np.ndarray:
    """Rotation angles in degrees of affines ``(..., 2, 2 or 3)``, their linear parts projected on rotations."""
    m = np.asarray(matrices, dtype=np.float64)
    return np.rad2deg(np.arctan2(m[..., 1, 0] - m[..., 0, 1], m[..., 0, 0] + m[..., 1, 1]))


def pair_sections(pairs: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """``(moving, fixed)``: the section indices ``z`` and ``j`` of pairs ``(z, j, ...)``, each ``(pairs,)`` int."""
    indices = np.array([(p[0], p[1]) for p in pairs], dtype=int).reshape(-1, 2)
    return indices[:, 0], indices[:, 1]


def centre_shifts(matrices: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(..., 2)`` px: where pull affines ``(..., 2, 3)`` take the centre of ``(Y, X)`` sections, less the centre
    (the shift of :func:`rigid_matrix`)."""
    m = np.asarray(matrices, dtype=np.float64)
    centre = _centre(shape)
    return m[..., 2] - centre + m[..., :2] @ centre


def _angle_and_shift(matrix: np.ndarray, shape: Sequence[int]) -> tuple[float, np.ndarray]:
    """Inverse of :func:`rigid_matrix` (the linear part is projected on a rotation)."""
    return float(angles(matrix)), centre_shifts(matrix, shape)


def angle_residuals(matrices: np.ndarray, pairs: Sequence[tuple[int, int, np.ndarray, float]]) -> np.ndarray:
    """Per pair ``(z, j, P, score)``, degrees: the pair's angle minus the solved sections' ``a_z - a_j``
    (``matrices (Z, 2, 3)``, as from :func:`solve_rigid`, where a pair asks ``T_z = P T_j``). ``(pairs,)``."""
    solved = angles(matrices)
    moving, fixed = pair_sections(pairs)
    measured = angles(np.array([p[2] for p in pairs], np.float64).reshape(-1, 2, 3))
    return (measured - (solved[moving] - solved[fixed]) + 180.0) % 360.0 - 180.0


def toward(first: np.ndarray, second: np.ndarray, weight: float, shape: Sequence[int]) -> np.ndarray:
    """The rigid pull affine whose angle and centre shift lie ``weight`` (0-1) of the way from those of ``first`` to
    those of ``second`` (``(2, 3)`` pull affines; linear parts projected on rotations, :func:`rigid_matrix`)."""
    (a, d), (b, e) = _angle_and_shift(first, shape), _angle_and_shift(second, shape)
    return rigid_matrix(a + weight * (b - a), d + weight * (e - d), shape)


def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    """``(..., 2, 3)`` -> ``(..., 3, 3)``."""
    m = np.asarray(matrix, dtype=np.float64)
    bottom = np.broadcast_to([0.0, 0.0, 1.0], (*m.shape[:-2], 1, 3))
    return np.concatenate([m, bottom], axis=-2)


def _compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pull affine of warping by ``first`` and then by ``second``: ``q = first(second(p))``."""
    return (_homogeneous(first) @ _homogeneous(second))[:2]


def _warp_affine(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Pull-warp ``image`` by a ``(2, 3)`` affine (bilinear, 0 outside): the same map as
    ``fields.warp(image, fields.affine_field(matrix, image.shape))``, without building a field."""
    m = np.asarray(matrix, dtype=np.float64)
    return ndimage.affine_transform(image, m[:, :2], offset=m[:, 2], order=1, cval=0.0, output=np.float32)


def _tukey(n: int) -> np.ndarray:
    """1D Tukey window of length ``n`` (cosine tapers over ``_TUKEY_ALPHA * n`` samples in all)."""
    x = np.linspace(0.0, 1.0, n)
    edge = _TUKEY_ALPHA / 2
    ramp = 0.5 * (1 - np.cos(np.pi * np.minimum(x, 1 - x) / edge))
    return np.where(np.minimum(x, 1 - x) < edge, ramp, 1.0)


def on_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A numpy array as a float32 tensor on ``device`` (shares the memory on the CPU when it can)."""
    return torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32), device=device)


@functools.lru_cache(maxsize=16)
def _window(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """2D Tukey window, float32 on ``device``."""
    return on_device(np.outer(_tukey(shape[0]), _tukey(shape[1])), device)


@functools.lru_cache(maxsize=16)
def _lowpass_weight(shape: tuple[int, int], lowpass: float, device: torch.device) -> torch.Tensor:
    """``sqrt(w / mean(w))`` with ``w`` a Gaussian of sigma ``lowpass`` cycles/pixel, on the real FFT's
    half grid ``(Y, X // 2 + 1)`` (the mean is over the whole grid), float32 on ``device``."""
    ky, kx = np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1])
    mean = np.exp(-0.5 * (ky[:, None] ** 2 + kx[None] ** 2) / lowpass**2).mean()
    w = np.exp(-0.5 * (ky[:, None] ** 2 + np.fft.rfftfreq(shape[1])[None] ** 2) / lowpass**2)
    return on_device(np.sqrt(w / mean), device)


def upscale_matrix(matrix: np.ndarray, factor: int) -> np.ndarray:
    """A pull affine measured on a ``factor``-block-mean grid, in full-resolution pixels.

    Low-resolution pixel ``i`` is centred at full-resolution ``factor * i + (factor - 1) / 2``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    offset = np.full(2, (factor - 1) / 2)
    return np.concatenate([m[:, :2], (factor * m[:, 2] + offset - m[:, :2] @ offset)[:, None]], axis=1)


def soft_ramp(shape: Sequence[int]) -> float:
    """Width (px) of :func:`soft_mask`'s rise for an image of ``shape (Y, X)``."""
    return max(2.0, min(shape) / 32)


def soft_mask(image: np.ndarray, mask: np.ndarray | None = None, ramp: float | None = None) -> np.ndarray:
    """Weights in ``[0, 1]`` of a ``(Y, X)`` image's pixels: 0 on no data (zeros, outside ``mask``),
    rising smoothly to 1 over ``ramp`` px away from it (so its edge does not correlate; default
    :func:`soft_ramp` of the image's shape: pass the whole image's to weigh a part of it, cut with a margin
    of ``ramp`` px, as the whole)."""
    valid = np.asarray(image) != 0
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    if valid.all() or not valid.any():
        return valid.astype(np.float32)
    ramp = soft_ramp(valid.shape) if ramp is None else ramp
    taper = np.clip(ndimage.distance_transform_edt(valid) / ramp, 0, 1)
    return (3 * taper**2 - 2 * taper**3).astype(np.float32)


def _rfft2(images: torch.Tensor) -> torch.Tensor:
    """Real FFT over the last two axes, on the images' device. On the CPU by scipy's pocketfft on one thread:
    torch's batched CPU transforms round differently with the number of threads, and a result must not depend
    on how many CPUs its task had."""
    if images.device.type == "cpu":
        return torch.from_numpy(scipy.fft.rfft2(images.numpy(), axes=(-2, -1), workers=1))
    return torch.fft.rfft2(images)


def _irfft2(spectra: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_rfft2` onto ``shape (Y, X)`` images, on the same terms."""
    if spectra.device.type == "cpu":
        return torch.from_numpy(scipy.fft.irfft2(spectra.numpy(), s=shape, axes=(-2, -1), workers=1))
    return torch.fft.irfft2(spectra, s=shape)


def whitened_spectra(
    images: torch.Tensor | np.ndarray | Sequence[torch.Tensor],
    weights: torch.Tensor | np.ndarray | Sequence[torch.Tensor] | None,
    lowpass: float | None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Whitened, low-pass weighted spectra of a batch of images, ready for phase correlation.

    Each image is standardised over its valid pixels, no-data is set to the mean, and the result
    is multiplied by a Tukey window and the soft validity ``weights``. The spectrum is divided by
    its magnitude and multiplied by ``sqrt(w / mean(w))``, ``w = exp(-k^2 / (2 lowpass^2))``, so
    that the correlation of an image with itself peaks at exactly 1. Computed on the device of
    ``images`` (a numpy array: the CPU), :data:`PASS_PIXELS` at a time.

    Args:
        images: ``(B, Y, X)``, or a sequence of ``B`` ``(Y, X)`` tensors (views, e.g. patches of one image: only a
            pass's worth is copied at a time).
        weights: like ``images``, from :func:`soft_mask`; or None to compute them from the zeros (on the CPU).
        lowpass: Gaussian sigma in cycles per pixel; None for flat (pure phase correlation).

    Returns:
        ``(spectra, magnitudes of the windowed images, blank (B,))``: spectra (complex64) and magnitudes
        (float32) tensors on the images' device, on the real FFT's half grid ``(B, Y, X // 2 + 1)``;
        ``blank`` numpy bool.
    """
    images = _as_batch(images)
    batch, (height, width), device = len(images), tuple(images[0].shape), images[0].device
    weights = None if weights is None else _as_batch(weights, device)
    spectra = torch.empty((batch, height, width // 2 + 1), dtype=torch.complex64, device=device)
    magnitude = torch.empty(spectra.shape, dtype=torch.float32, device=device)
    blank = np.zeros(batch, bool)
    for part in batch_passes(batch, height * width):
        chunk = _stacked(images, part)
        if weights is None:
            chunk_weights = np.stack([soft_mask(image) for image in chunk.cpu().numpy()])
        else:
            chunk_weights = _stacked(weights, part)
        spectra[part], magnitude[part], blank[part] = _whitened(
            chunk, torch.as_tensor(chunk_weights, dtype=torch.float32, device=device), lowpass
        )
    return spectra, magnitude, blank


PASS_PIXELS = 1 << 22
"""Image pixels that one pass of :func:`whitened_spectra` or :func:`correlation_peaks` takes (a batch goes in passes of
as many whole images, at least one): a pass's temporaries are several times its size."""


def batch_passes(batch: int, pixels: int) -> list[slice]:
    """The passes (slices of a batch of ``batch`` images of ``pixels`` each) of :data:`PASS_PIXELS` at most."""
    step = max(1, PASS_PIXELS // pixels)
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _as_batch(
    images: torch.Tensor | np.ndarray | Sequence[torch.Tensor], device: torch.device | None = None
) -> torch.Tensor | Sequence[torch.Tensor]:
    """A batch as :func:`whitened_spectra` takes it: a sequence of tensors as it is, anything else as one float32
    tensor (on ``device``, if given)."""
    if isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        return images
    return torch.as_tensor(images, dtype=torch.float32, device=device)


def _stacked(images: torch.Tensor | Sequence[torch.Tensor], part: slice) -> torch.Tensor:
    """The images ``part`` of a batch, as one ``(b, Y, X)`` float32 tensor."""
    chunk = images[part]
    return chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk)).float()


def _whitened(
    images: torch.Tensor, weights: torch.Tensor, lowpass: float | None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """:func:`whitened_spectra` of one pass: ``images`` and ``weights`` ``(b, Y, X)`` float32 on one device."""
    valid = weights > 0
    count = valid.sum(dim=(1, 2))
    # sums in float64: the same float32 result whatever the order (threads) a device sums in
    mean = (torch.where(valid, images, 0).sum(dim=(1, 2), dtype=torch.float64) / count.clamp(min=1)).float()
    centred = torch.where(valid, images - mean[:, None, None], 0)
    std = torch.sqrt((centred**2).sum(dim=(1, 2), dtype=torch.float64) / count.clamp(min=1)).float()
    blank = (count < _MIN_VALID * valid[0].numel()) | (std < 1e-6)
    window = _window(tuple(images.shape[1:]), images.device)
    transform = _rfft2(centred * weights * (window / std.clamp(min=1e-12)[:, None, None]))
    magnitude = transform.abs()
    spectra = transform / (magnitude + 1e-9 * magnitude.amax(dim=(1, 2), keepdim=True) + 1e-30)
    if lowpass:
        spectra *= _lowpass_weight(tuple(images.shape[1:]), lowpass, images.device)
    spectra[blank] = 0
    return spectra, magnitude, blank.cpu().numpy()


def _parabola(left: np.ndarray, centre: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vertex offsets of parabolas through (-1, left), (0, centre), (1, right), within [-1, 1]."""
    denom = left - 2 * centre + right
    safe = np.where(denom < 0, denom, -1.0)
    return np.where(denom < 0, np.clip(0.5 * (left - right) / safe, -1, 1), 0.0)


@functools.lru_cache(maxsize=8)
def _spline_upsampler(upsample: int) -> np.ndarray:
    """``(n, 2 _CROP + 1)`` matrix evaluating the cubic interpolating spline of samples at offsets
    ``-_CROP .. _CROP`` on ``-1.5 .. 1.5`` in steps of ``1 / upsample`` (applied along y and x)."""
    half = int(np.ceil(1.5 * upsample))
    positions = np.arange(-half, half + 1) / upsample + _CROP
    impulses = np.eye(2 * _CROP + 1)
    return np.stack([ndimage.map_coordinates(e, [positions], order=3, mode="nearest") for e in impulses], axis=1)


def correlation_peaks(
    fixed: torch.Tensor, moving: torch.Tensor, shape: tuple[int, int], upsample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel phase-correlation peaks of spectra from :func:`whitened_spectra` of ``shape (Y, X)`` images
    (broadcast over the batch).

    The correlation surface and its integer peak are computed on the spectra's device; the
    ``(2 _CROP + 1)^2`` samples around the peak come back to the CPU, where the peak is refined on a
    +-1.5 px window sampled every ``1 / upsample`` px by cubic-spline interpolation of the surface
    (smooth thanks to the low-pass; no BLAS, which is slow on busy machines), then by a parabola
    through the best sample.

    Returns:
        ``(shifts (B, 2), peaks (B,))`` numpy float64: pull shifts ``moving(p + shift) ~ fixed(p)`` and
        peak heights.
    """
    batch, (ny, nx) = max(len(fixed), len(moving)), shape
    window = torch.arange(-_CROP, _CROP + 1, device=fixed.device)
    crops, flat = [], []
    for part in batch_passes(batch, ny * nx):
        surface = _irfft2(_batch_part(fixed, part).conj() * _batch_part(moving, part), tuple(shape))
        peak = surface.reshape(len(surface), -1).argmax(dim=1, keepdim=True)
        rows, cols = (peak // nx + window) % ny, (peak % nx + window) % nx
        index = torch.arange(len(surface), device=surface.device)[:, None, None]
        crops.append(surface[index, rows[:, :, None], cols[:, None]])
        flat.append(peak[:, 0])
    crops, (iy, ix) = torch.cat(crops).cpu().numpy(), np.divmod(torch.cat(flat).cpu().numpy(), nx)
    b = np.arange(batch)
    size = np.array([ny, nx])
    coarse = (np.stack([iy, ix], axis=1) + size // 2) % size - size // 2
    if upsample <= 1:
        return coarse.astype(np.float64), np.maximum(crops[:, _CROP, _CROP], 0.0).astype(np.float64)
    interpolate = _spline_upsampler(upsample)
    fine = interpolate @ crops @ interpolate.T
    n, half = len(interpolate), len(interpolate) // 2
    i, j = np.unravel_index(fine.reshape(batch, -1).argmax(axis=1), (n, n))
    ic, jc = np.clip(i, 1, n - 2), np.clip(j, 1, n - 2)
    dy = np.where(i == ic, _parabola(fine[b, ic - 1, j], fine[b, i, j], fine[b, ic + 1, j]), 0.0)
    dx = np.where(j == jc, _parabola(fine[b, i, jc - 1], fine[b, i, j], fine[b, i, jc + 1]), 0.0)
    shifts = coarse + (np.stack([i + dy, j + dx], axis=1) - half) / upsample
    return shifts, np.maximum(fine[b, i, j], 0.0)


def _batch_part(spectra: torch.Tensor, part: slice) -> torch.Tensor:
    """The spectra ``part`` of a batch, or the one spectrum a batch of one broadcasts."""
    return spectra if len(spectra) == 1 else spectra[part]


def phase_correlation(
    fixed: np.ndarray,
    moving: np.ndarray,
    mask_fixed: np.ndarray | None = None,
    mask_moving: np.ndarray | None = None,
    upsample: int = 10,
    lowpass: float | None = LOWPASS,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, float]:
    """The translation that aligns ``moving`` to ``fixed``, by windowed phase correlation.

    Zero pixels (and pixels outside the optional masks) are no data: they are filled with the
    mean and tapered out smoothly, and the images are windowed (Tukey). Shifts up to about a
    third of the image are found. A second correlation, after shifting ``moving`` exactly by
    the rounded shift and restricting both images to their overlap, removes the bias toward
    zero that the common window gives large shifts.

    Args:
        fixed, moving: ``(Y, X)`` images of the same shape.
        mask_fixed, mask_moving: optional ``(Y, X)`` boolean masks of valid pixels.
        upsample: sub-pixel resolution ``1 / upsample`` px (spline-upsampled peak), refined by a parabola;
            about 0.01 px with the default low-pass, 0.1 px without.
        lowpass: Gaussian low-pass of the whitened cross-power spectrum, sigma in cycles/pixel
            (None: pure phase correlation, best for identical content).
        device: where the spectra are computed and correlated.

    Returns:
        ``(shift, peak)``: ``shift`` ``(dy, dx)`` in pixels is a pull shift,
        ``moving(p + shift) ~ fixed(p)``; ``peak`` in ``[0, 1]`` is the normalised correlation
        peak (~0 for unrelated or blank images, 1 for identical ones).
    """
    if np.shape(fixed) != np.shape(moving) or np.ndim(fixed) != 2:
        raise ValueError(f"need two (Y, X) images of one shape; got {np.shape(fixed)} and {np.shape(moving)}")
    fixed, moving = (
        np.asarray(image, dtype=np.float32) * (1 if mask is None else np.asarray(mask, dtype=bool))
        for image, mask in ((fixed, mask_fixed), (moving, mask_moving))
    )
    # First each image with its own no-data; then, after shifting ``moving`` by the rounded
    # shift, both restricted to their overlap (the common window's bias is then negligible).
    shift = np.zeros(2)
    for common in (False, True):
        offset = np.round(shift).astype(int)
        pair = np.stack([fixed, _shift_integer(moving, offset)])
        if common:  # crop to the overlap's bounding box, so that the window fits it
            overlap = (pair != 0).all(axis=0)
            rows, cols = np.flatnonzero(overlap.any(axis=1)), np.flatnonzero(overlap.any(axis=0))
            if len(rows) == 0:
                return np.zeros(2), 0.0
            pair = np.where(overlap, pair, 0)[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        weights = np.stack([soft_mask(image) for image in pair])
        spectra, _, blank = whitened_spectra(on_device(pair, device), on_device(weights, device), lowpass)
        if blank.any():
            return np.zeros(2), 0.0
        residual, peak = correlation_peaks(spectra[:1], spectra[1:], pair.shape[1:], upsample)
        shift = offset + residual[0]
    return shift, float(peak[0])


def _shift_integer(image: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``out(p) = image(p + offset)`` for an integer ``(dy, dx)``, zeros (no data) outside."""
    out = np.zeros_like(image)
    (dy, dx), (ny, nx) = offset, image.shape
    out[max(0, -dy) : ny - max(0, dy), max(0, -dx) : nx - max(0, dx)] = image[
        max(0, dy) : ny + min(0, dy), max(0, dx) : nx + min(0, dx)
    ]
    return out


def _polar_rings(magnitude: np.ndarray, width: int) -> np.ndarray:
    """Angular spectra of a Fourier magnitude on rings: ``(n_radii, _N_ANGLES // 2 + 1)`` complex, numpy.

    ``magnitude``: numpy, on the real FFT's half grid ``(Y, width // 2 + 1)`` of a ``(Y, width)`` image.
    Rings of log-magnitude between 0.04 and 0.4 cycles/pixel, each standardised over the angles
    ``[0, 180)`` degrees (the magnitude of a real image is symmetric; these angles sample the
    half grid's non-negative x frequencies), then transformed along angle.
    """
    ny = magnitude.shape[0]
    shifted = np.fft.fftshift(np.log1p(magnitude), axes=0)
    radii = np.linspace(0.04, 0.4, 24)
    angles = np.arange(_N_ANGLES) * np.pi / _N_ANGLES
    ky = radii[:, None] * np.cos(angles)[None] * ny + ny // 2
    kx = radii[:, None] * np.sin(angles)[None] * width
    rings = ndimage.map_coordinates(shifted, [ky, kx], order=1)
    rings = (rings - rings.mean(axis=1, keepdims=True)) / (rings.std(axis=1, keepdims=True) + 1e-12)
    return np.fft.rfft(rings, axis=1)


def patch_spectra(
    image: torch.Tensor, weights: torch.Tensor, slices: list[tuple[slice, slice]], lowpass: float | None
) -> torch.Tensor:
    """:func:`whitened_spectra` of the patches ``slices`` of one ``(Y, X)`` image, ``(P, py, px // 2 + 1)``, on the
    image's device; ``weights``: the whole image's :func:`soft_mask`, cut like the image (no-data edges carry
    over)."""
    return whitened_spectra([image[s] for s in slices], [weights[s] for s in slices], lowpass)[0]


class _Section:
    """An image (numpy, on the CPU) prepared once for matching (as fixed or moving) against several others;
    its spectra on ``device``."""

    def __init__(self, image: np.ndarray, lowpass: float | None, device: torch.device | str = "cpu"):
        self.image = np.asarray(image, dtype=np.float32)
        self.lowpass = lowpass
        self.weights = soft_mask(self.image)
        spectra, magnitude, blank = whitened_spectra(
            on_device(self.image[None], device), on_device(self.weights[None], device), lowpass
        )
        self.spectrum, self.blank = spectra, bool(blank[0])
        self._magnitude = magnitude[0]
        self._patches: tuple[list[tuple[slice, slice]], np.ndarray, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        """Where the section's spectra are."""
        return self.spectrum.device

    @functools.cached_property
    def polar(self) -> np.ndarray:
        """:func:`_polar_rings` of the section's Fourier magnitude (computed when a rotation is searched)."""
        return _polar_rings(self._magnitude.cpu().numpy(), self.image.shape[1])

    def patches(self) -> tuple[list[tuple[slice, slice]], np.ndarray, torch.Tensor]:
        """The refinement patches: ``(slices, centres (P, 2), spectra (P, py, px // 2 + 1))``."""
        if self._patches is None:
            shape = np.array(self.image.shape)
            size = shape // 2
            starts = [np.linspace(0, n - s, _PATCH_GRID).round().astype(int) for n, s in zip(shape, size, strict=True)]
            slices = [(slice(y, y + size[0]), slice(x, x + size[1])) for y in starts[0] for x in starts[1]]
            centres = np.array([[s[0].start, s[1].start] for s in slices]) + (size - 1) / 2
            image, weights = on_device(self.image, self.device), on_device(self.weights, self.device)
            self._patches = slices, centres, patch_spectra(image, weights, slices, self.lowpass)
        return self._patches


def _unrelated_peak(fixed: _Section, moving: _Section) -> float:
    """Phase-correlation peak of ``fixed`` with ``moving`` turned by 180 degrees (0 if either is blank).

    The window and the low-pass are symmetric, so the turned image's whitened spectrum is the
    conjugate of the image's (up to a translation, which does not change the peak height).
    """
    if fixed.blank or moving.blank:
        return 0.0
    return float(correlation_peaks(fixed.spectrum, moving.spectrum.conj(), fixed.image.shape, 1)[1][0])


def _angle_candidate(fixed: _Section, moving: _Section, max_rotation_deg: float) -> float:
    """The rotation (degrees, within the limit) at which the polar Fourier magnitudes correlate best."""
    profile = np.fft.irfft(np.sum(np.conj(fixed.polar) * moving.polar, axis=0), n=_N_ANGLES)
    step = 180.0 / _N_ANGLES
    lags = (np.arange(_N_ANGLES) + _N_ANGLES // 2) % _N_ANGLES - _N_ANGLES // 2
    best = int(np.argmax(np.where(np.abs(lags) * step <= max_rotation_deg, profile, -np.inf)))
    offset = _parabola(profile[best - 1], profile[best], profile[(best + 1) % _N_ANGLES])
    return float((lags[best] + offset) * step)


def robust_fit(
    design: np.ndarray, target: np.ndarray, weights: np.ndarray, min_rows: int, rounds: int = 2
) -> np.ndarray | None:
    """Weighted least squares of local pull shifts, refitted without outlying points.

    Args:
        design: ``(2 N, K)`` rows ``(dy, dx)`` of ``N`` points, interleaved, for ``K`` parameters.
        target: ``(2 N,)`` measured shifts, px, interleaved like ``design``.
        weights: ``(N,)`` weight of each point (0: no measurement).
        min_rows: fewest points kept for a fit.
        rounds: fits in all; each after the first leaves out the points whose residual exceeded 3 robust
            sigmas (and 0.5 px) in the one before (stops early when none is left out).

    Returns:
        ``(K,)`` parameters; None when fewer than ``min_rows`` points are usable.
    """
    keep = weights > 0
    for _ in range(rounds):
        if keep.sum() < min_rows:
            return None
        w = np.sqrt(np.repeat(weights * keep, 2))
        params = np.linalg.lstsq(design * w[:, None], target * w, rcond=None)[0]
        residual = np.hypot(*(design @ params - target).reshape(-1, 2).T)
        inliers = keep & (residual <= max(3 * 1.4826 * np.median(residual[keep]), 0.5))
        if (inliers == keep).all():
            break
        keep = inliers
    return params


def _fit_rigid(centres: np.ndarray, shifts: np.ndarray, weights: np.ndarray, centre: np.ndarray) -> np.ndarray | None:
    """Small rigid correction ``(angle_rad, ty, tx)`` best explaining local pull shifts at ``centres``.

    Model ``shift(p) = angle * (-(x - cx), y - cy) + t``; :func:`robust_fit`. None if under 3 patches.
    """
    rel = centres - centre
    design = np.zeros((2 * len(rel), 3))
    design[0::2, 0], design[1::2, 0] = -rel[:, 1], rel[:, 0]
    design[0::2, 1] = design[1::2, 2] = 1.0
    return robust_fit(design, shifts.reshape(-1), weights, 3)


def _refine(
    fixed: _Section, moving: _Section, matrix: np.ndarray, upsample: int, steps: int
) -> tuple[np.ndarray, float]:
    """Gauss-Newton steps fitting a rigid correction to the shifts of the fixed section's patches.

    Returns the refined matrix and the whole-image correlation peak at the last step's warp.
    """
    shape = fixed.image.shape
    slices, centres, spectra = fixed.patches()
    patch_shape = (slices[0][0].stop - slices[0][0].start, slices[0][1].stop - slices[0][1].start)
    for _ in range(steps):
        warped = _warp_affine(moving.image, matrix)
        warped, weights = on_device(warped, fixed.device), on_device(soft_mask(warped), fixed.device)
        patches = patch_spectra(warped, weights, slices, fixed.lowpass)
        params = _fit_rigid(centres, *correlation_peaks(spectra, patches, patch_shape, upsample), _centre(shape))
        if params is None:
            break
        matrix = _compose(matrix, rigid_matrix(np.rad2deg(params[0]), params[1:], shape))
    warped_spectrum = whitened_spectra(warped[None], weights[None], fixed.lowpass)[0]
    score = correlation_peaks(fixed.spectrum, warped_spectrum, shape, upsample)[1][0]
    return matrix, float(score)


def _estimate(
    fixed: _Section, moving: _Section, max_rotation_deg: float, upsample: int, refine_steps: int = REFINE_STEPS
) -> RigidEstimate:
    """Rigid registration of two prepared sections (of one shape), in their pixels."""
    shape = fixed.image.shape
    if fixed.blank or moving.blank:
        return RigidEstimate(rigid_matrix(0.0, (0, 0), shape), 0.0, np.zeros(2), 0.0)
    # Coarse: no rotation, or the best polar-magnitude candidate if it correlates better.
    shifts, peaks = correlation_peaks(fixed.spectrum, moving.spectrum, shape, upsample)
    angle, shift, score = 0.0, shifts[0], float(peaks[0])
    if max_rotation_deg > 0:
        candidate = _angle_candidate(fixed, moving, max_rotation_deg)
        rotated = _Section(
            _warp_affine(moving.image, rigid_matrix(candidate, (0, 0), shape)), fixed.lowpass, fixed.device
        )
        shifts, peaks = correlation_peaks(fixed.spectrum, rotated.spectrum, shape, upsample)
        if peaks[0] > score:
            angle, shift = candidate, shifts[0]
    matrix = rigid_matrix(angle, _rotation(angle) @ shift, shape)
    if max_rotation_deg > 0:
        matrix, score = _refine(fixed, moving, matrix, upsample, max(refine_steps, 1))
    angle, shift = _angle_and_shift(matrix, shape)
    return RigidEstimate(matrix, angle, shift, score)


def _to_full_resolution(estimate: RigidEstimate, factor: int, shape: Sequence[int]) -> RigidEstimate:
    if factor == 1:
        return estimate
    matrix = upscale_matrix(estimate.matrix, factor)
    angle, shift = _angle_and_shift(matrix, shape)
    return RigidEstimate(matrix, angle, shift, estimate.score)


def estimate_rigid(
    fixed: np.ndarray,
    moving: np.ndarray,
    max_rotation_deg: float = 10.0,
    downsample: int = 1,
    upsample: int = 10,
    lowpass: float | None = LOWPASS,
    device: torch.device | str = "cpu",
) -> RigidEstimate:
    """Rotation and translation that align ``moving`` to ``fixed``.

    Coarse: the rotation is the best (by phase-correlation peak) of no rotation and the peaks
    of the correlation of polar samples of the two Fourier magnitudes (Reddy & Chatterji;
    insensitive to translation); the translation is the phase correlation after that rotation.
    Fine: two Gauss-Newton steps fitting a rigid correction to the phase-correlation shifts of
    a 4 x 4 grid of overlapping half-size patches (robust to a few bad patches).

    Args:
        fixed, moving: ``(Y, X)`` images; zeros are no data.
        max_rotation_deg: largest rotation considered, degrees (0: translation only).
        downsample: match ``downsample``-block means (faster, coarser); the result is in
            full-resolution pixels.
        upsample: sub-pixel resolution of the phase correlation, ``1 / upsample`` px.
        lowpass: see :func:`phase_correlation` (cycles per pixel of the downsampled images).
        device: where the spectra are computed and correlated (images and warps stay on the CPU).

    Returns:
        :class:`RigidEstimate`: ``moving(matrix @ [p, 1]) ~ fixed(p)``.
    """
    if np.shape(fixed) != np.shape(moving) or np.ndim(fixed) != 2:
        raise ValueError(f"need two (Y, X) images of one shape; got {np.shape(fixed)} and {np.shape(moving)}")
    sections = [_Section(block_mean(image, downsample, nodata=True), lowpass, device) for image in (fixed, moving)]
    return _to_full_resolution(_estimate(*sections, max_rotation_deg, upsample), downsample, np.shape(fixed))


def affine_fields(matrices: np.ndarray, shape: Sequence[int], stride: int = 1) -> np.ndarray:
    """Pull fields of per-section affines on a grid of the given stride.

    Args:
        matrices: ``(Z, 2, 3)`` pull affines in full-resolution pixels.
        shape: full-resolution ``(Y, X)``.
        stride: grid spacing; sample ``i`` sits at full-resolution ``i * stride``.

    Returns:
        ``(Z, 2, ceil(Y / stride), ceil(X / stride))`` float32 fields in full-resolution pixels.
    """
    grid = tuple(-(-int(n) // stride) for n in shape[-2:])
    return np.stack([fields.affine_field(m, grid, stride) for m in np.asarray(matrices)]).astype(np.float32)


def _progress(iterable: Sequence[int], enabled: bool, description: str) -> Iterable[int]:
    """``iterable``, with a tqdm progress bar if ``enabled``."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description)


def pairwise_rigid(
    stack: np.ndarray,
    offsets: Sequence[int] = (1, 2, 3),
    downsample: int = 4,
    max_rotation_deg: float = 10.0,
    upsample: int = 10,
    lowpass: float | None = LOWPASS,
    progress: bool = False,
    refine_steps: int = REFINE_STEPS,
    unrelated: dict[int, float] | None = None,
    second_opinion: float | None = None,
    coarsest_side: int = SECOND_OPINION_SIDE,
    margins: dict[tuple[int, int], float] | None = None,
    device: torch.device | str = "cpu",
) -> list[tuple[int, int, np.ndarray, float]]:
    """Rigid estimates relating each section to several earlier ones, at reduced resolution.

    Each section is prepared once (block means, spectra); only ``max(offsets) + 1`` sections are
    held at a time, so ``stack`` may be a lazy ``(Z, Y, X)`` array (Zarr, dask) read section by section.

    Args:
        stack: ``(Z, Y, X)`` raw sections; zeros are no data.
        offsets: relate section ``z`` to ``z - k`` for each ``k``.
        downsample: block-mean factor of the matching.
        max_rotation_deg, upsample, lowpass: see :func:`estimate_rigid`.
        progress: show a progress bar.
        refine_steps: Gauss-Newton steps of the rotation refinement (at least 1 when rotations are searched).
        unrelated: if given, filled with ``{z: peak}``: the correlation peak of section ``z - 1`` with
            section ``z`` turned by 180 degrees (same content statistics, no shared structure): what a
            pair of unrelated sections scores in this stack.
        second_opinion: if given (e.g. :data:`SECOND_OPINION_MARGIN`), a pair whose peak is under this
            multiple of the median unrelated peak so far is matched again at ``2 * downsample`` and, while the
            images stay ``coarsest_side`` px wide, at 4x, 8x, ... ``downsample``; the estimate kept
            is the one whose peak stands highest above the unrelated peaks at its own scale (ratio to their
            median). Where sections change a lot (wide z-spacing, strain across wide sections) fine detail
            may not carry from one to the next while coarse structure does. The pair keeps the finer
            match's score (its weight in :func:`solve_rigid` and the break detection do not change).
        coarsest_side: see ``second_opinion`` (default :data:`SECOND_OPINION_SIDE`).
        margins: if given, filled with ``{(z, z - k): margin}`` where second opinions are asked: the kept
            estimate's peak over the median unrelated peak at its own scale (how clearly the pair matches at all,
            where the fine score alone says little).
        device: where the sections' spectra are held, computed and correlated (block means, warps and
            no-data weights stay on the CPU).

    Returns:
        ``[(z, z - k, matrix, score), ...]``: ``matrix`` ``(2, 3)`` is the full-resolution pull
        affine with ``raw_{z-k}(p) ~ raw_z(matrix @ [p, 1])``; ``score`` the correlation peak (0 for
        a blank section).
    """
    shape = tuple(stack.shape[-2:])
    side = min(shape) // downsample
    coarser = max(1, int(np.log2(max(side // coarsest_side, 1))))  # scale n: 2^n x coarser block means
    if not second_opinion or side // 2 < _MIN_SECOND_OPINION_SIDE:
        coarser = 0
    # per scale (0: the matching one): the sections held, and the unrelated peaks so far
    sections: list[dict[int, _Section]] = [{} for _ in range(coarser + 1)]
    floors: list[list[float]] = [[] for _ in range(coarser + 1)]

    def section(scale: int, z: int) -> _Section:
        if z not in sections[scale]:
            finer = section(scale - 1, z).image
            sections[scale][z] = _Section(block_mean(finer, 2, nodata=True), lowpass, device)
        return sections[scale][z]

    def floor(scale: int) -> float:
        return max(float(np.median(floors[scale])), 1e-6)

    pairs = []
    for z in _progress(range(stack.shape[0]), progress, "rigid pairs"):
        sections[0][z] = _Section(block_mean(np.asarray(stack[z]), downsample, nodata=True), lowpass, device)
        for held in sections:
            held.pop(z - max(offsets) - 1, None)
        if z - 1 in sections[0] and (unrelated is not None or coarser):
            peak = _unrelated_peak(sections[0][z - 1], sections[0][z])
            if unrelated is not None:
                unrelated[z] = peak
            if coarser and peak > 0:
                floors[0].append(peak)
                for scale in range(1, coarser + 1):
                    floors[scale].append(_unrelated_peak(section(scale, z - 1), section(scale, z)))
        for k in offsets:
            if z - k not in sections[0]:
                continue
            estimate = _estimate(sections[0][z - k], sections[0][z], max_rotation_deg, upsample, refine_steps)
            matrix = upscale_matrix(estimate.matrix, downsample)
            best = estimate.score / floor(0) if coarser and floors[0] else None
            if best is not None and best < second_opinion:
                for scale in range(1, coarser + 1):
                    other = _estimate(
                        section(scale, z - k), section(scale, z), max_rotation_deg, upsample, refine_steps
                    )
                    if other.score / floor(scale) > best:
                        best, matrix = other.score / floor(scale), upscale_matrix(other.matrix, 2**scale * downsample)
            if margins is not None and best is not None:
                margins[z, z - k] = best
            pairs.append((z, z - k, matrix, estimate.score))
    return pairs


def rigid_chain(
    stack: np.ndarray, downsample: int = 1, max_rotation_deg: float = 10.0, progress: bool = False
) -> np.ndarray:
    """The classic pairwise-rigid baseline: register each section to the previous raw one and chain.

    With ``aligned_{z-1}(p) = raw_{z-1}(T_{z-1} p)`` and the pair estimate ``raw_{z-1}(q) ~ raw_z(P q)``,
    ``aligned_z(p) = raw_z(P T_{z-1} p) ~ aligned_{z-1}(p)``: ``T_z = P T_{z-1}`` (product of
    homogeneous matrices), ``T_0`` the identity. Errors random-walk along z, and a blank or
    failed pair breaks the chain: the baseline that :func:`solve_rigid` improves on.

    Args:
        stack: ``(Z, Y, X)`` raw sections.
        downsample, max_rotation_deg: see :func:`estimate_rigid`.
        progress: show a progress bar.

    Returns:
        ``(Z, 2, 3)`` pull affines aligning each raw section into section 0's frame.
    """
    transforms = np.zeros((stack.shape[0], 2, 3))
    transforms[0] = np.eye(2, 3)
    for z, _, matrix, _ in pairwise_rigid(stack, (1,), downsample, max_rotation_deg, progress=progress):
        transforms[z] = _compose(matrix, transforms[z - 1])
    return transforms


def _incidence(n_sections: int, moving: np.ndarray, fixed: np.ndarray) -> sparse.csr_matrix:
    """``(pairs, sections)`` matrix with +1 at the moving and -1 at the fixed section of each pair."""
    rows = np.arange(len(moving))
    return sparse.csr_matrix(
        (np.r_[np.ones(len(rows)), -np.ones(len(rows))], (np.r_[rows, rows], np.r_[moving, fixed])),
        shape=(len(rows), n_sections),
    )


def _rotate(vectors: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``(N, 2)`` ``(y, x)`` vectors by per-row angles given by their cosines and sines."""
    return np.stack([cos * vectors[:, 0] - sin * vectors[:, 1], sin * vectors[:, 0] + cos * vectors[:, 1]], axis=1)


def pair_design(n_sections: int, moving: np.ndarray, fixed: np.ndarray, blocks: np.ndarray) -> sparse.csr_matrix:
    """``(2 pairs, 2 sections)`` matrix of ``v_z - B v_j`` for 2-vectors ``v`` per section, ``B`` ``(pairs, 2, 2)``."""
    pair = np.arange(len(moving))
    rows = np.concatenate([2 * pair, 2 * pair + 1] + [2 * pair + a for a in (0, 0, 1, 1)])
    cols = np.concatenate([2 * moving, 2 * moving + 1] + [2 * fixed + b for b in (0, 1, 0, 1)])
    values = np.concatenate([np.ones(2 * len(pair)), *(-blocks[:, a, b] for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))])
    return sparse.csr_matrix((values, (rows, cols)), shape=(2 * len(pair), 2 * n_sections))


def _translation_design(
    n_sections: int, moving: np.ndarray, fixed: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> sparse.csr_matrix:
    """``(2 pairs, 2 sections)`` matrix of ``t_z - R t_j`` (``R`` given by ``cos``, ``sin`` per pair)."""
    return pair_design(n_sections, moving, fixed, np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1))


def _least_squares(design: sparse.spmatrix, target: np.ndarray, weights: np.ndarray, prior: sparse.spmatrix):
    """Minimise ``sum weights (design x - target)^2 + x^T prior x`` (sparse normal equations); ``target`` ``(rows,)``
    or ``(rows, k)`` (``k`` problems sharing the weights)."""
    normal = (design.T @ sparse.diags(weights) @ design + prior).tocsc()
    return spsolve(normal, design.T @ (weights.reshape(-1, *[1] * (np.ndim(target) - 1)) * target))


def _match_weights(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights ``s^2 / (1 - s^2)`` of matches from their correlation peaks ``(P, ...)`` (clipped to
    [0, 0.99]; about the inverse error variance of a match), and per problem (axis 0 reduced) the mean
    positive weight (1 where there is none): the scale of the solve's prior."""
    peaks = np.clip(scores, 0.0, 0.99)
    weights = peaks**2 / (1 - peaks**2)
    positive = weights > 0
    scale = np.where(positive.any(axis=0), weights.sum(axis=0) / np.maximum(positive.sum(axis=0), 1), 1.0)
    return weights, scale


def _cauchy_reweight(
    weights: np.ndarray, robust: np.ndarray, residual: np.ndarray, reject: float, min_residual: float
) -> np.ndarray | None:
    """One re-weighting step of the robust solves, pairs along axis 0 (each column its own problem).

    The Cauchy scale of a problem is ``reject`` robust sigmas of its inliers' residuals (pairs still
    above half their weight), at least ``min_residual``. A problem without inliers keeps its weights;
    None when no problem has any (the solve stops).
    """
    inliers = robust > 0.5 * weights
    alive = inliers.any(axis=0)
    if not alive.any():
        return None
    typical = np.nanmedian(np.where(inliers[:, alive], residual[:, alive], np.nan), axis=0)
    cauchy = np.maximum(min_residual, reject * 1.4826 * typical)
    robust = robust.copy()
    robust[:, alive] = weights[:, alive] / (1 + (residual[:, alive] / cauchy) ** 2)
    return robust


def _offset_balance(offsets: np.ndarray, residual: np.ndarray, weights: np.ndarray, floor: float) -> np.ndarray:
    """Per pair, the weight factor of its z-offset class: 1, or ``(sigma_best / sigma_k)^2`` for a class whose
    typical residual ``sigma_k`` (median over its weighted pairs, at least ``floor`` px) is over
    :data:`OFFSET_CLASS_TOLERANCE` times the best class's."""
    classes = [k for k in np.unique(offsets) if (weights[offsets == k] > 0).any()]
    sigma = {k: max(floor, float(np.median(residual[(offsets == k) & (weights > 0)]))) for k in classes}
    factor = np.ones(len(offsets))
    if sigma:
        best = min(sigma.values())
        for k, value in sigma.items():
            if value > OFFSET_CLASS_TOLERANCE * best:
                factor[offsets == k] = (best / value) ** 2
    return factor


def solve_rigid(
    n_sections: int,
    pairs: Sequence[tuple[int, int, np.ndarray, float]],
    shape: Sequence[int],
    spring: float = 0.0,
    reject: float = 3.0,
    min_residual: float = 1.0,
    iterations: int = 10,
) -> np.ndarray:
    """Per-section rigid transforms that best agree with redundant pairwise estimates.

    Unknowns are an angle ``a_z`` and a translation ``t_z`` (about the image centre) per
    section, ``T_z = rigid_matrix(a_z, t_z)``. A pair ``(z, j, P, score)`` asks ``T_z = P T_j``:
    ``a_z - a_j = a_P`` (linear, solved first) and then, with the solved angles,
    ``t_z - R(a_z - a_j) t_j = t_P`` (linear too). Both are weighted least squares, weight
    ``score^2 / (1 - score^2)`` (about the inverse error variance of a match), with a negligible
    first-difference prior along z (it bridges sections without usable pairs, e.g. blank ones)
    and an optional spring toward the raw geometry. Outliers are down-weighted by iteratively
    re-weighted least squares with a Cauchy loss whose scale is ``reject`` robust sigmas of the
    residuals (at least ``min_residual`` px); a pair's residual combines its translation error
    and its angle error times the RMS radius of the image. Pairs are also trusted by class, per
    offset ``z - j``: a class whose typical residual is over :data:`OFFSET_CLASS_TOLERANCE` times
    the best class's is down-weighted by the squared ratio (at wide z-spacing, pairs three
    sections apart match near the noise floor and would pull the solve). The gauge is fixed
    afterwards: mean angle and mean translation over z are zero.

    Args:
        n_sections: ``Z``.
        pairs: ``(z, j, matrix, score)`` as from :func:`pairwise_rigid`.
        shape: full-resolution ``(Y, X)`` of the sections.
        spring: weight of ``a_z = 0, t_z = 0`` relative to the mean pair weight (0: none).
        reject: Cauchy scale in robust sigmas of the residuals.
        min_residual: smallest Cauchy scale, px.
        iterations: re-weighted solves after the first.

    Returns:
        ``(Z, 2, 3)`` pull affines ``aligned_z = raw_z o T_z``, all into one common frame.
    """
    moving, fixed = pair_sections(pairs)
    weights, scale = _match_weights(np.array([float(p[3]) for p in pairs], float).reshape(-1, 1))
    weights, scale = weights[:, 0], float(scale[0])
    measured = [_angle_and_shift(p[2], shape) for p in pairs]
    pair_angles = np.deg2rad([m[0] for m in measured])
    pair_shifts = np.array([m[1] for m in measured]).reshape(-1, 2)
    radius = np.sqrt(sum(n**2 for n in shape[-2:]) / 12)  # RMS distance of the image's pixels to its centre
    difference = _incidence(n_sections, np.arange(1, n_sections), np.arange(n_sections - 1))
    prior = scale * (1e-4 * difference.T @ difference + (spring + 1e-9) * sparse.identity(n_sections))
    prior2 = sparse.kron(prior, sparse.identity(2))
    incidence = _incidence(n_sections, moving, fixed)
    robust = weights.copy()
    for _ in range(iterations + 1):
        angles = _least_squares(incidence, pair_angles, robust, prior)
        relative = angles[moving] - angles[fixed]
        cos, sin = np.cos(relative), np.sin(relative)
        design = _translation_design(n_sections, moving, fixed, cos, sin)
        shifts = _least_squares(design, pair_shifts.reshape(-1), np.repeat(robust, 2), prior2).reshape(-1, 2)
        error = shifts[moving] - _rotate(shifts[fixed], cos, sin) - pair_shifts
        residual = np.sqrt((error**2).sum(axis=1) + (radius * (relative - pair_angles)) ** 2)
        balanced = weights * _offset_balance(moving - fixed, residual, weights, min_residual)
        reweighted = _cauchy_reweight(balanced[:, None], robust[:, None], residual[:, None], reject, min_residual)
        if reweighted is None:
            break
        robust = reweighted[:, 0]
    angles -= angles.mean()
    cos, sin = np.cos(angles), np.sin(angles)
    mean_rotation = np.array([[cos.mean(), -sin.mean()], [sin.mean(), cos.mean()]])
    gauge = -np.linalg.solve(mean_rotation, shifts.mean(axis=0))
    shifts += _rotate(gauge[None], cos, sin)
    return np.stack([rigid_matrix(np.rad2deg(a), t, shape) for a, t in zip(angles, shifts, strict=True)])


def solve_translations(
    n_sections: int,
    moving: np.ndarray,
    fixed: np.ndarray,
    shifts: np.ndarray,
    scores: np.ndarray,
    reject: float = 3.0,
    min_residual: float = 1.0,
    iterations: int = 10,
) -> np.ndarray:
    """:func:`solve_rigid` without rotations, for many independent problems that share their pairs.

    Each problem (e.g. a patch position of every section) asks ``t_z - t_j = shift`` for every pair
    ``(z, j)``; the same weights, Cauchy re-weighting, negligible first-difference prior and gauge
    (mean translation zero) as :func:`solve_rigid`, which gives the same translations when all its
    angles are zero and no offset class is down-weighted (this solve trusts every offset class alike;
    it serves the polish stage, by default run only at fine z-spacing, where the classes agree). The normal
    equations are banded (bandwidth: the largest ``z - j``), so each problem costs O(Z).

    Args:
        n_sections: ``Z``.
        moving, fixed: ``(P,)`` section indices ``z > j`` of each pair.
        shifts: ``(P, N, 2)`` measured ``t_z - t_j`` (px) per pair and problem; non-finite: no measurement.
        scores: ``(P, N)`` correlation peaks (0 or non-finite: the pair does not count).
        reject, min_residual, iterations: see :func:`solve_rigid`.

    Returns:
        ``(Z, N, 2)`` translations (px).
    """
    moving, fixed = np.asarray(moving, int), np.asarray(fixed, int)
    shifts, scores = np.asarray(shifts, float), np.asarray(scores, float)
    usable = np.isfinite(scores) & np.isfinite(shifts).all(axis=-1)
    shifts = np.where(usable[..., None], shifts, 0.0)
    weights, scale = _match_weights(np.where(usable, scores, 0.0))  # (P, N), (N,)
    problems = weights.shape[1]
    band = int(max(moving - fixed, default=1)) if len(moving) else 1
    prior = np.zeros((band + 1, n_sections))  # first-difference prior (1e-4) and a tiny ridge, upper banded form
    prior[band, :-1] += 1e-4
    prior[band, 1:] += 1e-4
    prior[band] += 1e-9
    prior[band - 1, 1:] = -1e-4
    robust = weights.copy()
    solution = np.zeros((problems, n_sections, 2))
    for _ in range(iterations + 1):
        normal = prior[None] * scale[:, None, None]
        rhs = np.zeros((problems, n_sections, 2))
        for d in np.unique(moving - fixed):
            pick = moving - fixed == d
            w = robust[pick].T  # (N, P_d)
            np.add.at(normal[:, band], (slice(None), moving[pick]), w)
            np.add.at(normal[:, band], (slice(None), fixed[pick]), w)
            np.add.at(normal[:, band - d], (slice(None), moving[pick]), -w)
            weighted = w[..., None] * np.transpose(shifts[pick], (1, 0, 2))
            np.add.at(rhs, (slice(None), moving[pick]), weighted)
            np.add.at(rhs, (slice(None), fixed[pick]), -weighted)
        for n in range(problems):
            solution[n] = solveh_banded(normal[n], rhs[n])
        error = solution[:, moving] - solution[:, fixed] - np.transpose(shifts, (1, 0, 2))  # (N, P, 2)
        residual = np.sqrt((error**2).sum(axis=-1)).T  # (P, N)
        reweighted = _cauchy_reweight(weights, robust, residual, reject, min_residual)
        if reweighted is None:
            break
        robust = reweighted
    solution -= solution.mean(axis=1, keepdims=True)
    return np.transpose(solution, (1, 0, 2))


def jitter_and_wander(values: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a trajectory ``values (Z, k)``, the variance ``s^2`` of independent per-section jitter and the
    step variance ``q`` of a random-walk wander (accumulated pairwise noise) that explain its differences.

    Over the sections that count (``weights > 0``, in order), lag-1 and lag-2 differences have mean squares
    ``D1 = 2 s^2 + q`` and ``D2 = 2 s^2 + 2 q``: ``q = D2 - D1``, ``s^2 = (2 D1 - D2) / 2``, each at least 0
    (both 0 with fewer than 4 such sections).
    """
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    kept = values if weights is None else values[np.asarray(weights) > 0]
    if len(kept) < 4:
        return np.zeros(values.shape[1]), np.zeros(values.shape[1])
    lag1 = np.mean((kept[1:] - kept[:-1]) ** 2, axis=0)
    lag2 = np.mean((kept[2:] - kept[:-2]) ** 2, axis=0)
    return np.maximum(2 * lag1 - lag2, 0.0) / 2, np.maximum(lag2 - lag1, 0.0)


def misaligned_slope(
    values: np.ndarray,
    trend: np.ndarray,
    weights: np.ndarray | None = None,
    tolerance: float = SLOPE_TOLERANCE,
    wander: bool = False,
    max_slope: float = np.inf,
) -> np.ndarray:
    """The part of a trajectory's linear trend along z that its own per-section misalignment explains.

    A Whittaker trend (:func:`emalign.consensus.smooth_trend`) passes a straight line unchanged, so it keeps the
    linear component of independent per-section misalignment too: over ``Z`` sections of jitter variance ``s^2``
    the fitted slope has variance ``s^2 / S``, ``S = sum_z (z - zbar)^2`` (about 8 % of ``s`` per section at
    ``Z = 12``). Per column, the slope ``b`` of ``values`` (weighted least squares) is that of the trend, and the
    part of it attributed to the misalignment is ``g b``, ``g = min(1, tolerance^2 s^2 / (S b^2))``: all of a
    slope within ``tolerance`` of what the jitter explains, and no more than ``tolerance s / sqrt(S)`` of a
    steeper one (content that runs obliquely through the stack, a stage drift). An aligned stack's jitter is
    its pairwise noise, so the slope taken from it is within that noise.

    With ``wander`` (trajectories solved from noisy pairs, such as the angles, that wander by their accumulated
    noise), ``s^2`` and the wander's step come from :func:`jitter_and_wander`, not from ``values - trend``, and
    ``g`` is scaled by the share of the slope's variance that the jitter explains against the wander's
    (``s^2 / S`` against that of a random walk's slope): a wander's slope is noise, not misalignment.

    Args:
        values: ``(Z, k)`` per-section parameters (e.g. the centre shifts, px).
        trend: ``(Z, k)`` their smooth trend (``values - trend`` is the jitter; unused with ``wander``).
        weights: ``(Z,)`` weight of each section (0: ignore); default all 1.
        tolerance: see :data:`SLOPE_TOLERANCE`.
        wander: see above.
        max_slope: the steepest slope (the values' units per section) left to the trend: of a steeper one, the
            rest is misalignment too (content does not run through a stack that fast).

    Returns:
        ``(Z, k)`` the linear trend to correct together with the jitter: ``g b (z - zbar)``, and where ``(1 - g) b``
        is steeper than ``max_slope``, all of the slope but ``max_slope``.
    """
    values = np.asarray(values, np.float64).reshape(len(values), -1)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, np.float64)
    if w.sum() <= 0 or np.count_nonzero(w) < 3:
        return np.zeros_like(values)
    z = np.arange(len(values), dtype=np.float64)
    zc = z - np.average(z, weights=w)
    spread = float(w @ zc**2)
    slope = (w * zc) @ (values - np.average(values, axis=0, weights=w)) / spread
    share = 1.0
    if wander:
        jitter, step = jitter_and_wander(values, w)
        lever = np.cumsum((w * zc)[::-1])[::-1][1:]  # a walk's step at z moves every later section
        walk = step * float(lever @ lever) / spread**2
        share = jitter / spread / np.maximum(jitter / spread + walk, 1e-300)
    else:
        jitter = np.average((values - np.asarray(trend, np.float64).reshape(values.shape)) ** 2, axis=0, weights=w)
    explained = tolerance**2 * jitter / spread
    gain = np.where(slope**2 > explained, explained / np.maximum(slope**2, 1e-300), 1.0) * share
    kept = np.clip((1.0 - gain) * slope, -max_slope, max_slope)
    return zc[:, None] * (slope - kept)[None]


def detrend_rigid(
    matrices: np.ndarray,
    shape: Sequence[int],
    stiffness: float,
    weights: np.ndarray | None = None,
    angle_stiffness: float | None = None,
    angle_wander: bool = True,
    max_drift: float = np.inf,
) -> np.ndarray:
    """Remove the smooth trend along z from per-section rigid transforms.

    Each transform's angle and centre shift are a trajectory along z; its Whittaker-smooth
    trend (:func:`emalign.consensus.smooth_trend`: curvature penalised, slope free) is
    content that moves slowly through the stack (oblique structures, a stage drift) and is
    kept; what is left, the per-section jitter, is the misalignment to correct, together with
    the part of the shifts' and the angles' slope that the jitter explains (:func:`misaligned_slope`;
    for the angles against the wander of their accumulated pairwise noise, or all of it without
    ``angle_wander``): with large offsets or rotations a few sections' misalignment has a slope of its
    own, which the network cannot see (the stitch is blind to what grows linearly along z) and would
    leave in the output.

    Args:
        matrices: ``(Z, 2, 3)`` rigid pull affines (as from :func:`solve_rigid`).
        shape: ``(Y, X)`` of the sections.
        stiffness: curvature weight of the shifts' trend; larger is closer to a straight line.
        weights: ``(Z,)`` weight of each section in the trend (0: ignore, e.g. blank).
        angle_stiffness: curvature weight of the angles' trend (default: ``stiffness``).
        angle_wander: weigh the angles' slope against a wander (:func:`misaligned_slope`); False where the pairs
            measure the angles far more precisely than they vary: their whole slope is misalignment.
        max_drift: the steepest straight drift of the centre shifts kept as content, px per section.

    Returns:
        ``(Z, 2, 3)`` rigid pull affines holding only the jitter about the trend.
    """
    from emalign.consensus import smooth_trend

    params = np.column_stack([angles(matrices), centre_shifts(matrices, shape)])
    trend = np.empty_like(params)
    trend[:, 0] = smooth_trend(params[:, 0], stiffness if angle_stiffness is None else angle_stiffness, weights)
    trend[:, 1:] = smooth_trend(params[:, 1:], stiffness, weights)
    trend[:, 1:] -= misaligned_slope(params[:, 1:], trend[:, 1:], weights, max_slope=max_drift)
    trend[:, :1] -= (
        misaligned_slope(params[:, :1], trend[:, :1], weights, wander=True)
        if angle_wander
        else misaligned_slope(params[:, :1], trend[:, :1], weights, tolerance=np.inf)
    )
    jitter = params - trend
    return np.stack([rigid_matrix(a, (dy, dx), shape) for a, dy, dx in jitter])
