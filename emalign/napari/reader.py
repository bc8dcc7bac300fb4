"""The napari reader: an emalign output folder as layer-data tuples ``(data, kwargs, layer_type)``.

Layers, bottom to top (each a plain tuple, so this module does not import napari):

* ``raw``: the input the output was made from (lazily read, hidden at first; skipped with a warning
  when the input has moved),
* ``field |u| px``: length of the global pull field per section, on its stride grid (hidden at first),
* ``field vectors``: the same field, at most :data:`MAX_VECTORS` arrows per side of a section, from an
  aligned pixel ``p`` to ``p + u(p)``, where its content was in the raw section (hidden at first),
* ``aligned``: the multiscale pyramid ``OUT/0, OUT/1, ...``,
* ``QC flags``: a red frame and label on every flagged section (blank, damaged, skipped), the whole
  QC table (``qc.csv``) as its features and in the aligned layer's metadata.

Every layer carries the voxel size of the NGFF metadata as its ``scale`` (and the unit), so layers of
different grids (pixels, field grid) line up. An incomplete output is shown with a warning.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from emalign.errors import EmalignError, IncompleteOutputWarning
from emalign.io import emalign_attrs, open_stack
from emalign.pipeline.store import flag_text

LayerData = tuple[Any, dict, str]
MAX_VECTORS = 32  # arrows per side of a section in the vectors layer
MAX_LEVELS = 16
AXES = ("z", "y", "x")


def get_reader(path: str | os.PathLike | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """The npe2 reader hook: :func:`read_output` for an emalign output folder, None for anything else."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    return read_output if emalign_attrs(Path(path)) is not None else None


def read_output(path: str | os.PathLike | Sequence[str]) -> list[LayerData]:
    """All layers of an emalign output (see the module docstring); warns when the output is incomplete."""
    if isinstance(path, list | tuple):
        path = path[0]
    path = Path(path)
    attrs = emalign_attrs(path)
    if attrs is None:
        raise EmalignError(f"{path}: not an emalign output (no attrs['emalign'])")
    group = zarr.open_group(str(path), mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteOutputWarning)  # said once, below, with the reader's advice
        aligned = aligned_layer(path, attrs)
    data, meta = aligned[0], aligned[1]
    shape = tuple(int(s) for s in (data[0] if meta["multiscale"] else data).shape)
    if not attrs.get("complete"):
        done = int(np.count_nonzero(group["done"][:])) if "done" in group else 0
        warnings.warn(
            f"{path}: the alignment is incomplete ({done} of {shape[0]} sections written; the rest show as zeros); "
            "run the same `emalign align` again to finish it",
            UserWarning,
            stacklevel=2,
        )
    scale, unit = meta["scale"], meta["units"][0]
    rows = qc_rows(path, shape[0])
    meta["metadata"]["qc"] = rows
    layers = []
    raw = raw_layer(attrs, shape, scale, unit)
    if raw is not None:
        layers.append(raw)
    if "fields/global" in group:
        fields = group["fields/global"]
        stride = int(fields.attrs.get("stride") or attrs["params"]["stride"])
        factor = int((attrs.get("resolution") or {}).get("factor", 1))
        layers += field_layers(fields, stride, scale, unit=unit, factor=factor)
    layers.append(aligned)
    layers.append(qc_layer(rows, shape, scale, unit=unit))
    return layers


def _contrast(section: np.ndarray) -> tuple[float, float]:
    """Display range of a section: 0.5 and 99.5 percentiles of its non-zero pixels (full dtype range if empty)."""
    values = section[section != 0]
    if values.size == 0:
        info = np.iinfo(section.dtype) if section.dtype.kind in "ui" else None
        return (float(info.min), float(info.max)) if info else (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def _image_kwargs(levels: list[da.Array], name: str, scale: Sequence[float], unit: str, **extra: Any) -> dict:
    """Common kwargs of the aligned and raw image layers (contrast from the middle section, coarsest level)."""
    top = levels[-1]
    return {
        "name": name,
        "multiscale": len(levels) > 1,
        "scale": tuple(float(s) for s in scale),
        "units": (unit,) * 3,
        "axis_labels": AXES,
        "contrast_limits": _contrast(np.asarray(top[top.shape[0] // 2])),
        "metadata": {},
        **extra,
    }


def _pyramid(path: str | os.PathLike, first: int = 0) -> list[da.Array]:
    """The levels ``first, first + 1, ...`` of a stack as dask arrays, while each is smaller than the one before."""
    levels = [open_stack(path, level=first).data]
    for level in range(first + 1, first + MAX_LEVELS):
        try:
            data = open_stack(path, level=level).data
        except EmalignError:
            break
        if data.shape[0] != levels[0].shape[0] or not all(
            s < p for s, p in zip(data.shape[1:], levels[-1].shape[1:], strict=True)
        ):
            break
        levels.append(data)
    return levels


def aligned_layer(path: str | os.PathLike, attrs: dict | None = None) -> LayerData:
    """The aligned pyramid as a (multiscale) image layer, scale and unit from the NGFF metadata."""
    attrs = attrs if attrs is not None else emalign_attrs(Path(path)) or {}
    base = open_stack(path)
    levels = _pyramid(path)
    meta = _image_kwargs(levels, "aligned", base.voxel_size, base.unit, colormap="gray", blending="translucent")
    meta["metadata"] = {"emalign": attrs, "path": str(path), "complete": bool(attrs.get("complete"))}
    return (levels if len(levels) > 1 else levels[0], meta, "image")


def raw_layer(attrs: dict, shape: Sequence[int], scale: Sequence[float], unit: str) -> LayerData | None:
    """The input the output was made from, on the aligned layer's grid; None (with a warning) if it is gone."""
    source = (attrs.get("input") or {}).get("path")
    level = int((attrs.get("params") or {}).get("level") or 0)
    if not source:
        return None
    try:
        levels = _pyramid(source, level)
    except EmalignError as err:
        warnings.warn(f"raw input not shown: {err}", UserWarning, stacklevel=3)
        return None
    if tuple(levels[0].shape) != tuple(shape):
        warnings.warn(
            f"raw input not shown: {source} has shape {tuple(levels[0].shape)}, the alignment {tuple(shape)}",
            UserWarning,
            stacklevel=3,
        )
        return None
    meta = _image_kwargs(levels, "raw", scale, unit, colormap="gray", visible=False)
    meta["metadata"] = {"path": source}
    return (levels if len(levels) > 1 else levels[0], meta, "image")


def field_layers(
    fields: Any,
    stride: int,
    scale: Sequence[float],
    translate: Sequence[float] = (0.0, 0.0, 0.0),
    unit: str = "pixel",
    name: str = "field",
    factor: int = 1,
) -> list[LayerData]:
    """A field magnitude image and a decimated vectors layer from pull fields ``(Z, 2, gy, gx)`` on a stride grid.

    ``scale``/``translate`` are those of the image the fields belong to (full-resolution pixels); field
    sample ``(i, j)`` sits at working pixel ``(i * stride, j * stride)``, values in working pixels, ``factor``
    full-resolution pixels each (the alignment's working resolution). ``fields`` may be a Zarr or NumPy array;
    the magnitude stays lazy, the vectors read every ``k``-th sample (at most :data:`MAX_VECTORS` per side).
    """
    depth, _, gy, gx = (int(s) for s in fields.shape)
    scale = tuple(float(s) for s in scale)
    translate = tuple(float(t) for t in translate)
    stride = stride * factor
    lazy = da.from_array(fields, chunks=(1, 2, gy, gx))
    magnitude = factor * da.sqrt((lazy.astype(np.float32) ** 2).sum(axis=1))
    grid_scale = (scale[0], scale[1] * stride, scale[2] * stride)
    middle = np.asarray(magnitude[depth // 2])
    common = {"units": (unit,) * 3, "axis_labels": AXES, "translate": translate, "visible": False}
    magnitude_layer = (
        magnitude,
        {
            "name": f"{name} |u| px",
            "scale": grid_scale,
            "colormap": "magma",
            "contrast_limits": (0.0, max(float(middle.max()), 1e-3)),
            "metadata": {"stride": stride, "what": "length of the pull field, full-resolution pixels"},
            **common,
        },
        "image",
    )
    step = max(1, math.ceil(max(gy, gx) / MAX_VECTORS))
    sampled = factor * np.asarray(fields[:, :, ::step, ::step], dtype=np.float32)  # (Z, 2, vy, vx), full-res px
    z, iy, ix = np.meshgrid(np.arange(depth), np.arange(sampled.shape[2]), np.arange(sampled.shape[3]), indexing="ij")
    vectors = np.zeros((z.size, 2, 3), np.float32)
    vectors[:, 0] = np.stack([z.ravel(), iy.ravel() * step * stride, ix.ravel() * step * stride], axis=1)
    vectors[:, 1, 1] = sampled[:, 0].ravel()
    vectors[:, 1, 2] = sampled[:, 1].ravel()
    lengths = np.hypot(vectors[:, 1, 1], vectors[:, 1, 2])
    typical = float(np.percentile(lengths, 95)) if lengths.size else 0.0
    drawn = float(max(1, round(0.8 * step * stride / typical))) if typical > 0 else 1.0  # arrows about a spacing long
    vectors_layer = (
        vectors,
        {
            "name": f"{name} vectors",
            "scale": scale,
            "features": {"length_px": lengths},
            "edge_color": "length_px",
            "edge_colormap": "plasma",
            "edge_width": max(1.0, step * stride / 10),
            "vector_style": "arrow",
            "length": drawn,
            "metadata": {
                "stride": stride * step,
                "what": f"pull field: arrow from aligned p towards raw p + u(p), drawn {drawn:g}x longer",
            },
            **common,
        },
        "vectors",
    )
    return [magnitude_layer, vectors_layer]


def qc_rows(path: str | os.PathLike, depth: int) -> list[dict]:
    """The per-section QC table: ``qc.csv`` when written (numbers as floats), else the flags alone, else ``[]``."""
    path = Path(path)
    table = path / "qc.csv"
    if table.exists():
        with open(table, newline="") as handle:
            return [
                {
                    key: (value if key == "flags" else int(value) if key == "z" else float(value or "nan"))
                    for key, value in row.items()
                }
                for row in csv.DictReader(handle)
            ]
    group = zarr.open_group(str(path), mode="r")
    if "sections/flags" not in group:
        return []
    flags = np.asarray(group["sections/flags"][:depth], np.uint8)
    return [{"z": z, "flags": flag_text(int(f))} for z, f in enumerate(flags)]


def qc_layer(
    rows: list[dict],
    shape: Sequence[int],
    scale: Sequence[float],
    translate: Sequence[float] = (0.0, 0.0, 0.0),
    unit: str = "pixel",
) -> LayerData:
    """A points layer framing each flagged section in red, labelled ``z N: flags``; its features are the QC rows."""
    flagged = [row for row in rows if row.get("flags")]
    _, height, width = (int(s) for s in shape)
    points = np.array([[row["z"], (height - 1) / 2, (width - 1) / 2] for row in flagged], np.float32).reshape(-1, 3)
    columns = list(rows[0]) if rows else ["z", "flags"]
    features = {key: np.array([row.get(key) for row in flagged]) for key in columns}
    if not flagged:
        features = {"z": np.zeros(0, int), "flags": np.zeros(0, str)}
    return (
        points,
        {
            "name": "QC flags",
            "scale": tuple(float(s) for s in scale),
            "translate": tuple(float(t) for t in translate),
            "units": (unit,) * 3,
            "axis_labels": AXES,
            "size": 0.96 * min(height, width),
            "symbol": "square",
            "face_color": "transparent",
            "border_color": "red",
            "border_width": 0.01,
            "features": features,
            "text": {"string": "z {z}: {flags}", "color": "red", "size": 14, "anchor": "upper_left"},
            "metadata": {"qc": rows},
        },
        "points",
    )


__all__ = ["MAX_VECTORS", "aligned_layer", "field_layers", "get_reader", "qc_layer", "qc_rows", "read_output"]
