"""The "Align sections" dock widget: align an image layer (or a z-range of it) without freezing the viewer.

The sections are read and aligned by :func:`emalign.register_sections` in a napari worker thread; the
widget's progress bar counts the alignment's stages (prealign, network, stitch, refine, polish), and the result comes
back as new layers on the source layer's grid: ``<name> aligned`` (translated to the first section of
the range) and the pull fields (``<name> field |u| px`` and ``<name> field vectors``, hidden at first).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Layer
from napari.qt.threading import FunctionWorker, create_worker
from superqt.utils import ensure_main_thread

from emalign import models
from emalign.napari.reader import field_layers
from emalign.register import METHODS, Registration, register_sections

FIELD_STRIDE = 8  # grid (px) the widget keeps of the full-resolution fields


def align_sections(
    stack: np.ndarray,
    model: str,
    method: str = "stitched",
    device: str = "auto",
    report: Callable[[int, int], None] | None = None,
) -> Registration:
    """:func:`emalign.register_sections` with ``report(done, total)`` after each of its stages."""
    return register_sections(stack, model=model, method=method, device=device, report=report)


def _read_and_align(data: object, z0: int, z1: int, model: str, method: str, report: Callable) -> Registration:
    """Worker body: read sections ``z0:z1`` of a layer's data (NumPy, dask, Zarr) and align them."""
    return align_sections(np.asarray(data[z0:z1]), model, method, report=report)


class AlignWidget(Container):
    """Align the chosen image layer, sections ``first..last``, with a shipped model or a checkpoint."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self.viewer = viewer  # before the widgets: the layer choices read it
        shipped = sorted(p.stem for p in models.WEIGHTS_DIR.glob("*.pt"))
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.first = SpinBox(label="first section", min=0, max=0)
        self.last = SpinBox(label="last section", min=0, max=0)
        self.model = ComboBox(label="model", choices=shipped, value=models.DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="or checkpoint", mode="r", filter="*.pt", value=None, nullable=True)
        self.method = ComboBox(label="method", choices=METHODS, value="stitched")
        self.run = PushButton(text="Align")
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="", value="")
        widgets = [self.image, self.first, self.last, self.model, self.checkpoint, self.method, self.run]
        super().__init__(widgets=[*widgets, self.progress, self.status])
        self.worker: FunctionWorker | None = None
        self.image.changed.connect(self._update_range)
        self.run.clicked.connect(self.start)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            event.connect(self.reset_choices)
        self.reset_choices()
        self._update_range()

    def _image_layers(self, _widget: object = None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image) and not layer.rgb]

    def _update_range(self, *_: object) -> None:
        layer = self.image.value
        depth = int((layer.data[0] if layer.multiscale else layer.data).shape[0]) if layer is not None else 1
        for box in (self.first, self.last):
            box.max = max(0, depth - 1)
        self.first.value, self.last.value = 0, depth - 1

    def start(self) -> FunctionWorker | None:
        """Start aligning in a worker thread (returns it; None with a message in ``status`` if nothing to do)."""
        layer = self.image.value
        if layer is None:
            self.status.value = "no image layer to align"
            return None
        data = layer.data[0] if layer.multiscale else layer.data
        z0, z1 = int(self.first.value), int(self.last.value) + 1
        if data.ndim != 3 or z1 - z0 < 2:
            self.status.value = f"need a 3D (z, y, x) layer and 2 sections or more; got {data.shape}, {z0}..{z1 - 1}"
            return None
        model = str(self.checkpoint.value) if self.checkpoint.value else self.model.value
        method = self.method.value
        self.run.enabled = False
        self.progress.max, self.progress.value = 1, 0
        self.status.value = f"aligning sections {z0}..{z1 - 1} of {layer.name} with {Path(model).name} ({method})"
        worker = create_worker(
            _read_and_align, data, z0, z1, model, method, self._report, _progress={"desc": "emalign: aligning"}
        )
        worker.returned.connect(lambda result: self._add_result(result, layer, z0, model, method))
        worker.errored.connect(self._show_error)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()
        return worker

    @ensure_main_thread
    def _report(self, done: int, total: int) -> None:
        self.progress.max = total
        self.progress.value = done

    def _add_result(self, result: Registration, layer: Image, z0: int, model: str, method: str) -> None:
        scale = tuple(layer.scale[-3:])
        translate = list(layer.translate[-3:])
        translate[0] += z0 * scale[0]
        z1 = z0 + len(result.aligned)
        info = {"source": layer.name, "sections": [z0, z1 - 1], "model": model, "method": method}
        self.viewer.add_image(
            result.aligned,
            name=f"{layer.name} aligned",
            scale=scale,
            translate=translate,
            units=layer.units[-3:],
            colormap="gray",
            contrast_limits=layer.contrast_limits,
            metadata={"emalign": info},
        )
        grid = np.ascontiguousarray(result.fields[:, :, ::FIELD_STRIDE, ::FIELD_STRIDE])
        for data, meta, kind in field_layers(grid, FIELD_STRIDE, scale, translate, name=f"{layer.name} field"):
            meta["units"] = layer.units[-3:]
            self.viewer.add_layer(Layer.create(data, meta, kind))
        self.status.value = f"aligned sections {z0}..{z1 - 1} of {layer.name}"

    def _show_error(self, error: Exception) -> None:
        self.status.value = f"error: {error}"

    def _finished(self) -> None:
        self.run.enabled = True


__all__ = ["AlignWidget", "align_sections"]
