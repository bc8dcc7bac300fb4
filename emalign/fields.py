"""Displacement fields: one convention for 2D and 3D, numpy and torch.

Conventions (used everywhere in emalign):

* Arrays are ``z, y, x``. A 2D field has shape ``(2, Y, X)`` with channels ``(dy, dx)``;
  a 3D field has shape ``(3, Z, Y, X)`` with channels ``(dz, dy, dx)``. Batched torch
  fields add a leading batch axis: ``(N, 2, Y, X)`` / ``(N, 3, Z, Y, X)``.
* Values are in pixels (of the grid the field is sampled on unless a function says
  otherwise), float32.
* Pull (backward) convention: ``warped(p) = image(p + u(p))``.
* Composition: ``(u o v)(p) = v(p) + u(p + v(p))``; warping by ``u o v`` equals warping
  by ``u`` first and then by ``v``: ``warp(warp(img, u), v) == warp(img, compose(u, v))``.
* Sampling outside the image gives ``cval`` (0) for images and the nearest border value
  (clamping) for fields.

The conversion to ``torch.nn.functional.grid_sample`` coordinates happens in exactly one
place, :func:`_normalised_grid`, with ``align_corners=True``: pixel centre ``i`` maps to
``-1 + 2 i / (n - 1)``, so a shift of ``s`` pixels moves the image by exactly ``s``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "affine_field",
    "compose",
    "compose_torch",
    "folding_percent",
    "invert",
    "invert_torch",
    "jacobian_determinant",
    "rescale",
    "rescale_torch",
    "resample",
    "sample",
    "warp",
    "warp_torch",
]


def _identity(spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pixel coordinates of a grid, shape ``(ndim, *spatial)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _normalised_grid(coords: torch.Tensor, source_shape: tuple[int, ...]) -> torch.Tensor:
    """Pixel coordinates ``(N, D, *S)`` into a source of ``source_shape`` -> ``grid_sample`` grid.

    The only place emalign converts to ``grid_sample`` conventions: ``align_corners=True``
    (pixel ``i`` of an axis of length ``n`` is ``-1 + 2 i / (n - 1)``; axes of length 1
    map to 0) and the last axis reversed (grid_sample wants ``x, y[, z]``). Result
    ``(N, *S, D)``.
    """
    ndim = coords.shape[1]
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in source_shape], device=coords.device, dtype=coords.dtype)
    grid = coords * scale.view(1, -1, *([1] * ndim)) - 1.0
    return grid.permute(0, *range(2, 2 + ndim), 1).flip(-1)


def _sample(
    source: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """Sample ``source (N, C, *S_in)`` at pixel coordinates ``coords (N, D, *S_out)``."""
    grid = _normalised_grid(coords.to(source.dtype), tuple(source.shape[2:]))
    return F.grid_sample(source, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_torch(
    image: torch.Tensor,
    field: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Pull-warp a batch of images: ``out(p) = image(p + field(p))``.

    Args:
        image: ``(N, C, Y, X)`` or ``(N, C, Z, Y, X)``.
        field: ``(N, 2, Y, X)`` or ``(N, 3, Z, Y, X)`` in pixels of this grid; its spatial
            shape is the output's and must match the image's.
        mode: ``"bilinear"`` (trilinear in 3D) or ``"nearest"`` (for labels).
        padding_mode: ``"zeros"`` (images) or ``"border"`` (fields: clamp to the edge).
    """
    if image.shape[2:] != field.shape[2:]:
        raise ValueError(f"image spatial shape {tuple(image.shape[2:])} != field's {tuple(field.shape[2:])}")
    coords = _identity(tuple(field.shape[2:]), field.device, field.dtype).unsqueeze(0) + field
    return _sample(image, coords, mode=mode, padding_mode=padding_mode)


def compose_torch(u: torch.Tensor, v: torch.Tensor, stride: float = 1.0) -> torch.Tensor:
    """Batched composition ``(u o v)(p) = v(p) + u(p + v(p))``; both ``(N, D, *S)``.

    ``stride``: grid spacing of both fields, whose values are in full-resolution pixels
    (1 when the fields are in pixels of their own grid).
    """
    return v + warp_torch(u, v / stride, padding_mode="border")


def invert_torch(u: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Batched inverse ``w`` of a pull field with ``u o w = 0``, by ``w(p) = -u(p + w(p))``.

    Converges for fields without folds (``|grad u| < 1``); u is clamped outside its grid.
    """
    w = -u
    for _ in range(iterations):
        w = -warp_torch(u, w, padding_mode="border")
    return w


def rescale_torch(field: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize a batched field given in pixels of its own grid to ``size``, scaling its values.

    A field of ``(N, D, *S)`` measured in pixels of the ``S`` grid becomes ``(N, D, *size)``
    in pixels of the new grid: each channel is multiplied by ``(size_i - 1) / (S_i - 1)``
    (corner-aligned grids), so a field at half resolution doubles when upsampled.
    """
    spatial = field.shape[2:]
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    out = F.interpolate(field, size=size, mode=mode, align_corners=True)
    factors = [(n_out - 1) / max(n_in - 1, 1) for n_in, n_out in zip(spatial, size, strict=True)]
    return out * torch.tensor(factors, dtype=out.dtype, device=out.device).view(1, -1, *([1] * len(size)))


def _as_batched(array: np.ndarray, channels: bool, device: torch.device | None = None) -> torch.Tensor:
    """``array`` as a float32 tensor with a batch axis (and a channel axis unless it has ``channels``), on ``device``
    (default: the CPU)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device or "cpu")
    return tensor.unsqueeze(0) if channels else tensor.unsqueeze(0).unsqueeze(0)


def _check_field(field: np.ndarray) -> int:
    if field.ndim not in (3, 4) or field.shape[0] != field.ndim - 1:
        raise ValueError(f"a field must be (2, Y, X) or (3, Z, Y, X); got shape {field.shape}")
    return field.shape[0]


def warp(
    image: np.ndarray, field: np.ndarray, order: int = 1, cval: float = 0.0, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Pull-warp an image: ``out(p) = image(p + field(p))``, computed on ``device``.

    Args:
        image: ``(Y, X)`` for a 2D field or ``(Z, Y, X)`` for a 3D one; any real dtype.
        field: ``(2, Y, X)`` / ``(3, Z, Y, X)`` in pixels, same spatial shape as the image.
        order: 1 for (bi/tri)linear, 0 for nearest (labels keep their values).
        cval: value outside the image.

    Returns:
        float32 array of the image's shape (cast it back if you need the input dtype).
    """
    ndim = _check_field(field)
    if image.shape != field.shape[1:]:
        raise ValueError(f"image shape {image.shape} != field spatial shape {field.shape[1:]}")
    if ndim != image.ndim:
        raise ValueError(f"a {ndim}D field cannot warp a {image.ndim}D image")
    device = torch.device(device)
    img = _as_batched(np.asarray(image, dtype=np.float32) - cval, False, device)
    out = warp_torch(img, _as_batched(field, True, device), mode="nearest" if order == 0 else "bilinear")
    return out[0, 0].cpu().numpy() + np.float32(cval)


def compose(u: np.ndarray, v: np.ndarray, stride: float = 1.0) -> np.ndarray:
    """``(u o v)(p) = v(p) + u(p + v(p))``: warping by the result = warping by u, then by v.

    ``stride``: both fields sampled every ``stride`` full-resolution pixels, values in
    full-resolution pixels (see :func:`compose_torch`).
    """
    _check_field(u)
    if u.shape != v.shape:
        raise ValueError(f"fields of different shapes: {u.shape} and {v.shape}")
    return compose_torch(_as_batched(u, True), _as_batched(v, True), stride)[0].numpy()


def invert(u: np.ndarray, iterations: int = 30) -> np.ndarray:
    """The pull field ``w`` with ``u o w = 0`` (warping by u then by w is the identity).

    See :func:`invert_torch`.
    """
    _check_field(u)
    return invert_torch(_as_batched(u, True), iterations)[0].numpy()


def rescale(field: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize a field given in pixels of its own grid to ``shape``, scaling the values.

    ``(D, *S) -> (D, *shape)``; see :func:`rescale_torch`.
    """
    _check_field(field)
    return rescale_torch(_as_batched(field, True), tuple(shape))[0].numpy()


def resample(
    field: np.ndarray,
    stride_in: float,
    stride_out: float,
    shape_out: tuple[int, ...],
    origin: tuple[float, ...] | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Re-sample a field in full-resolution pixels from one grid stride to another (computed on ``device``).

    Grid sample ``i`` of a field with stride ``s`` sits at full-resolution coordinate
    ``i * s`` (corner-aligned). Values are full-resolution pixels and are not scaled.
    Outside the input grid the border value is used.

    Args:
        field: ``(D, *S)``, stride ``stride_in``.
        stride_in, stride_out: grid spacings in full-resolution pixels.
        shape_out: spatial shape of the output grid.
        origin: full-resolution coordinate of the output's first sample (default 0): a
            window of a larger grid.
    """
    _check_field(field)
    device = torch.device(device)
    positions = _identity(tuple(shape_out), device, torch.float32) * stride_out
    if origin is not None:
        shift = torch.tensor(origin, dtype=torch.float32, device=device)
        positions = positions + shift.view(-1, *([1] * len(shape_out)))
    out = _sample(_as_batched(field, True, device), (positions / stride_in).unsqueeze(0))
    return out[0].cpu().numpy()


def sample(
    image: np.ndarray, coords: np.ndarray, order: int = 1, cval: float = 0.0, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Values of ``image (Y, X)`` at pixel coordinates ``coords (2, h, w)`` (bilinear or nearest), computed on
    ``device``.

    Also 3D: ``image (Z, Y, X)``, ``coords (3, d, h, w)`` (trilinear or nearest). Outside the image
    gives ``cval``. Returns float32 ``coords.shape[1:]``.
    """
    device = torch.device(device)
    img = _as_batched(np.asarray(image, dtype=np.float32) - cval, False, device)
    mode = "nearest" if order == 0 else "bilinear"
    out = _sample(img, _as_batched(coords, True, device), mode=mode, padding_mode="zeros")
    return out[0, 0].cpu().numpy() + np.float32(cval)


def affine_field(
    matrix: np.ndarray, shape: tuple[int, ...], stride: float = 1.0, origin: tuple[float, ...] | None = None
) -> np.ndarray:
    """The pull field of an affine map ``q = A p + t`` on a grid of the given stride.

    Args:
        matrix: ``(D, D+1)`` (or homogeneous ``(D+1, D+1)``) in axis order (``y, x`` in 2D),
            mapping full-resolution output coordinates ``p`` to input coordinates ``q``.
        shape: spatial shape of the grid; sample ``i`` sits at ``origin + i * stride``.
        origin: full-resolution coordinate of the first sample (default 0): a window of a larger grid.

    Returns:
        ``(D, *shape)`` float32 field ``u(p) = A p + t - p`` in full-resolution pixels.
    """
    ndim = len(shape)
    m = np.asarray(matrix, dtype=np.float64)[:ndim]
    start = (0,) * ndim if origin is None else origin
    axes = [o + np.arange(n) * stride for o, n in zip(start, shape, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(ndim, -1)
    mapped = m[:, :ndim] @ coords + m[:, ndim:]
    return (mapped - coords).reshape(ndim, *shape).astype(np.float32)


def jacobian_determinant(field: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of ``p -> p + u(p)``, per pixel, shape ``S``."""
    ndim = _check_field(field)
    grads = [np.gradient(field[c], axis=tuple(range(ndim))) for c in range(ndim)]
    jac = np.empty((*field.shape[1:], ndim, ndim), dtype=np.float64)
    for i in range(ndim):
        for j in range(ndim):
            jac[..., i, j] = grads[i][j] + (1.0 if i == j else 0.0)
    return np.linalg.det(jac).astype(np.float32)


def folding_percent(field: np.ndarray) -> float:
    """Percentage of grid points where the map folds (Jacobian determinant <= 0)."""
    return float(100.0 * np.mean(jacobian_determinant(field) <= 0))
