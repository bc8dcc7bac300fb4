"""What ``emalign view PATH`` opens: two linked napari windows on one emalign output.

* The **xy window** shows three panels side by side (napari's grid mode, two layers per panel):
  ``aligned`` with the ``QC flags`` frames, ``raw`` with its own copy of the frames, and the field
  (``field |u| px`` under the ``field vectors``). One z slider drives all panels; ``aligned`` and
  ``raw`` share their contrast.
* The **xz window** is the reslice: the same ``aligned`` and ``raw`` data (no copy) with the dims
  order rolled so z runs down the screen and x across, at the physical voxel size, so a bad
  alignment shows as jagged membranes. Its slider picks y (shown in its title).

The windows' sliders are linked both ways (each window slices at the same (z, y, x) point), and
contrast changes on either window's ``aligned``/``raw`` reach the other window.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import napari
from napari.experimental import link_layers
from napari.layers import Layer
from qtpy.QtWidgets import QApplication

from emalign.errors import EmalignError
from emalign.io import emalign_attrs
from emalign.napari.reader import read_output

XZ_ORDER = (1, 0, 2)  # dims order of the reslice window: slice along y, show (z, x)


def _grid(viewer: napari.Viewer):
    """The grid model (``viewer.canvas.grid`` since napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def _link_steps(first: napari.Viewer, second: napari.Viewer) -> None:
    """Keep the two viewers' slider positions equal, both ways."""

    def follow(source: napari.Viewer, target: napari.Viewer):
        def update(_event: object = None) -> None:
            if tuple(target.dims.current_step) != tuple(source.dims.current_step):
                target.dims.current_step = source.dims.current_step

        return update

    first.dims.events.current_step.connect(follow(first, second))
    second.dims.events.current_step.connect(follow(second, first))


def _link_contrast(layers: Sequence[Layer]) -> None:
    """Share contrast limits and gamma among image layers that live in different viewers."""

    def spread(source: Layer):
        def update(_event: object = None) -> None:
            for layer in layers:
                if layer is not source and tuple(layer.contrast_limits) != tuple(source.contrast_limits):
                    layer.contrast_limits = source.contrast_limits
                if layer is not source and layer.gamma != source.gamma:
                    layer.gamma = source.gamma

        return update

    for layer in layers:
        layer.events.contrast_limits.connect(spread(layer))
        layer.events.gamma.connect(spread(layer))


def open_views(path: str | os.PathLike, show: bool = True) -> tuple[napari.Viewer, napari.Viewer]:
    """Open the xy window (aligned | raw | field, grid mode) and the xz reslice window on an emalign output."""
    path = Path(path)
    if emalign_attrs(path) is None:
        raise EmalignError(f"{path}: not an emalign output (expected the OUT folder of `emalign align`)")
    found = {meta["name"]: (data, meta, kind) for data, meta, kind in read_output(path)}
    xy = napari.Viewer(title=f"emalign: {path.name} (xy)", show=show)
    xz = napari.Viewer(title=f"emalign: {path.name} (xz)", show=show)

    def add(viewer: napari.Viewer, key: str, **changes: object) -> Layer | None:
        if key not in found:
            return None
        data, meta, kind = found[key]
        return viewer.add_layer(Layer.create(data, {**meta, "visible": True, **changes}, kind))

    # grid panels fill left to right from the bottom of the layer list, two layers each
    groups = [("aligned", "QC flags"), ("raw", "QC flags"), ("field |u| px", "field vectors")]
    groups = [group for group in groups if group[0] in found]
    for image, overlay in groups:
        add(xy, image)
        add(xy, overlay, name=f"{overlay} ({image})" if overlay == "QC flags" else overlay)
    grid = _grid(xy)
    grid.stride, grid.shape, grid.enabled = 2, (1, len(groups)), True
    pair = [xy.layers[name] for name in ("aligned", "raw") if name in xy.layers]
    if len(pair) == 2:
        link_layers(pair, ("contrast_limits", "gamma"))
    for key in ("aligned", "raw"):  # aligned on top
        add(xz, key)
    xz_grid = _grid(xz)
    xz_grid.shape, xz_grid.enabled = (len(xz.layers), 1), True
    xz.dims.order = XZ_ORDER
    _link_contrast([layer for viewer in (xy, xz) for layer in viewer.layers if layer.name in ("aligned", "raw")])
    _link_steps(xy, xz)

    def retitle(_event: object = None) -> None:
        y = xz.dims.point[1]
        xz.title = f"emalign: {path.name} (xz at y = {y:g})"

    xz.dims.events.current_step.connect(retitle)
    xz.dims.current_step = xy.dims.current_step
    retitle()
    QApplication.processEvents()  # let the windows take their size before fitting the camera to the grid
    for viewer in (xy, xz):
        viewer.reset_view()
    return xy, xz


def main(path: str | os.PathLike) -> None:
    """Open both windows and run napari's event loop until they are closed."""
    open_views(path)
    napari.run()


__all__ = ["XZ_ORDER", "main", "open_views"]
