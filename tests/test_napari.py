"""The napari plugin: the reader's layers, the align widget, ``emalign view`` and what the viewer shows.

The reader builds plain layer data, so its tests run anywhere. The others open real napari windows: on
Linux without a display they start their own Xvfb (Debian: ``xvfb libgl1-mesa-dri ...``, see .ci/run);
without napari or Xvfb they skip with the reason, except under CI, where they must run and fail instead.
The output under test: 8 sections of 264 x 264 px (two pyramid levels), 40 x 4 x 4 nm, one of them blank.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from emalign.cli import main
from emalign.metrics import adjacent_correlation
from emalign.napari.reader import get_reader, read_output
from emalign.pipeline import AlignParams, align
from emalign.synth import Misaligned, em_texture, misalign

VOXEL = (40.0, 4.0, 4.0)
SHAPE = (8, 264, 264)


def _unavailable(reason: str) -> None:
    """Skip for a user without napari or a display; in CI (CI set) these tests must run, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the napari tests (see .ci/run)")
    pytest.skip(reason)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process ends (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _start_xvfb() -> None:
    """Xvfb on a free display number, alive as long as this process; sets DISPLAY."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        _unavailable("no display and no Xvfb: apt-get install xvfb libgl1-mesa-dri (the list is in .ci/run)")
    read_end, write_end = os.pipe()
    command = [xvfb, "-displayfd", str(write_end), "-screen", "0", "1600x1000x24", "-nolisten", "tcp", "-noreset"]
    process = subprocess.Popen(
        command,
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    os.close(write_end)
    answer, deadline = b"", time.monotonic() + 30
    while not answer.endswith(b"\n") and time.monotonic() < deadline:  # Xvfb writes the number, then "\n"
        if select.select([read_end], [], [], 1)[0]:
            chunk = os.read(read_end, 64)
            if not chunk:
                break
            answer += chunk
    os.close(read_end)
    number = answer.decode().strip() if answer.endswith(b"\n") else ""
    if not number:
        process.kill()
        _unavailable("Xvfb did not start within 30 s")
    os.environ["DISPLAY"] = f":{number}"


@pytest.fixture(scope="session")
def display() -> None:
    """A display for Qt: the user's own, or an Xvfb started here (it ends with the test process, after Qt)."""
    if importlib.util.find_spec("napari") is None:
        _unavailable("napari is not installed: pip install -e '.[napari]'")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        _start_xvfb()


@pytest.fixture
def viewer(display):
    import napari

    viewer = napari.Viewer(show=True)
    yield viewer
    viewer.close()


@pytest.fixture(scope="module")
def case() -> Misaligned:
    """A misaligned stack with a blank section."""
    return misalign(em_texture(SHAPE, seed=3, z_step=4.0), seed=3, artifacts=["blank"])


@pytest.fixture(scope="module")
def stack(case) -> np.ndarray:
    return case.stack


@pytest.fixture(scope="module")
def output(tmp_path_factory, stack, one_torch_thread) -> Path:
    """An aligned output of a TIFF with ImageJ calibration (40 nm sections, 4 nm pixels)."""
    folder = tmp_path_factory.mktemp("napari")
    tiff = folder / "raw.tif"
    calibration = {"resolution": (1 / VOXEL[1], 1 / VOXEL[2]), "metadata": {"spacing": VOXEL[0], "unit": "nm"}}
    tifffile.imwrite(tiff, stack, imagej=True, **calibration)
    align(tiff, folder / "aligned.zarr", AlignParams(block=8), scheduler_spec="sync", device="cpu", progress=False)
    return folder / "aligned.zarr"


def _copy(output: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(output, copy)
    return copy


def _layers(found: list) -> dict:
    return {meta["name"]: (data, meta, kind) for data, meta, kind in found}


@pytest.mark.e2e
def test_reader_gives_raw_fields_aligned_and_qc_layers_on_the_ngff_voxel_grid(output, case):
    stack, blank = case.stack, case.flags.index("blank")
    assert get_reader(str(output)) is read_output
    found = read_output(str(output))
    names = [meta["name"] for _, meta, _ in found]
    assert names == ["raw", "field |u| px", "field vectors", "aligned", "QC flags"]
    layers = _layers(found)
    data, meta, kind = layers["aligned"]
    assert kind == "image" and meta["multiscale"]
    assert [tuple(level.shape) for level in data] == [SHAPE, (8, 132, 132)]
    assert meta["scale"] == VOXEL and meta["units"] == ("nanometer",) * 3
    assert meta["metadata"]["complete"] and meta["metadata"]["emalign"]["params"]["stride"] == 8
    raw, raw_meta, _ = layers["raw"]
    assert raw_meta["scale"] == VOXEL and not raw_meta["visible"]
    np.testing.assert_array_equal(np.asarray(raw[5]), stack[5])
    magnitude, magnitude_meta, _ = layers["field |u| px"]
    # 4 nm pixels are aligned at 2x block means (8 nm): the stored grid is in working pixels, shown in input pixels
    assert magnitude.shape == (8, 17, 17) and magnitude_meta["scale"] == (40.0, 64.0, 64.0)
    fields = 2 * np.asarray(zarr.open_group(str(output), mode="r")["fields/global"][5])
    np.testing.assert_allclose(np.asarray(magnitude[5]), np.hypot(fields[0], fields[1]), rtol=1e-5)
    vectors, vectors_meta, kind = layers["field vectors"]
    assert kind == "vectors" and vectors_meta["scale"] == VOXEL
    assert vectors.shape[1:] == (2, 3) and len(vectors) <= 8 * 32 * 32
    first = vectors[np.argmax((vectors[:, 0, 0] == 5) & (vectors[:, 0, 1] == 0) & (vectors[:, 0, 2] == 0))]
    np.testing.assert_allclose(first[1], [0.0, fields[0, 0, 0], fields[1, 0, 0]], rtol=1e-6)
    points, qc_meta, kind = layers["QC flags"]
    assert kind == "points" and qc_meta["scale"] == VOXEL
    assert points[:, 0].tolist() == [blank] and list(qc_meta["features"]["flags"]) == ["blank"]
    assert [row["z"] for row in qc_meta["metadata"]["qc"]] == list(range(8))
    assert meta["metadata"]["qc"][blank]["flags"] == "blank"


@pytest.mark.e2e
def test_reader_warns_about_an_incomplete_output_and_still_opens_it(output, tmp_path):
    copy = _copy(output, tmp_path)
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["emalign"] = {**group.attrs["emalign"], "complete": False}
    group["done"][6] = False
    with pytest.warns(UserWarning, match=r"incomplete \(7 of 8 sections written"):
        found = _layers(read_output(copy))
    assert not found["aligned"][1]["metadata"]["complete"]
    assert "field vectors" in found


@pytest.mark.e2e
def test_reader_leaves_out_a_raw_input_that_has_moved_with_a_warning(output, tmp_path):
    copy = _copy(output, tmp_path)
    group = zarr.open_group(str(copy), mode="r+")
    attrs = group.attrs["emalign"]
    group.attrs["emalign"] = {**attrs, "input": {**attrs["input"], "path": str(tmp_path / "gone.tif")}}
    with pytest.warns(UserWarning, match="raw input not shown.*gone.tif"):
        names = list(_layers(read_output(copy)))
    assert names == ["field |u| px", "field vectors", "aligned", "QC flags"]


@pytest.mark.e2e
def test_reader_declines_what_is_not_an_emalign_output(output, tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 8, 8), np.uint8))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(2,), dtype="u1")
    assert get_reader(str(tmp_path / "stack.tif")) is None
    assert get_reader(str(tmp_path / "plain.zarr")) is None
    assert get_reader([str(output), str(output)]) is None
    assert get_reader([str(output)]) is read_output


@pytest.mark.e2e
def test_emalign_view_of_a_path_that_is_not_an_output_ends_with_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["view", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and str(tmp_path / "missing.zarr") in result.stderr


@pytest.mark.e2e
def test_napari_opens_an_output_through_the_plugin_manifest(viewer, output):
    layers = viewer.open(str(output), plugin="emalign")
    assert [layer.name for layer in layers] == ["raw", "field |u| px", "field vectors", "aligned", "QC flags"]
    aligned = viewer.layers["aligned"]
    assert aligned.multiscale and tuple(aligned.scale) == VOXEL
    assert tuple(viewer.layers["field |u| px"].scale) == (40.0, 64.0, 64.0)  # 2x working factor at 4 nm
    assert viewer.layers["QC flags"].features["flags"].tolist() == ["blank"]
    assert str(aligned.units[0]) == "nanometer"


def _wait(worker, seconds: float = 180.0) -> int:
    """Run the Qt event loop until the worker has finished; returns how many times the loop ran meanwhile."""
    from qtpy.QtWidgets import QApplication

    finished = []
    worker.finished.connect(lambda: finished.append(True))
    turns, deadline = 0, time.monotonic() + seconds
    while not finished:
        assert time.monotonic() < deadline, "the align worker did not finish in time"
        QApplication.processEvents()
        time.sleep(0.01)
        turns += 1
    QApplication.processEvents()
    return turns


@pytest.mark.e2e
def test_align_widget_aligns_a_z_range_of_a_layer_in_a_worker_thread(viewer, stack, one_torch_thread):
    from emalign.napari.widget import AlignWidget

    source = viewer.add_image(stack[:, :128, :128], name="raw", scale=VOXEL)
    _, widget = viewer.window.add_plugin_dock_widget("emalign", "Align sections")
    assert isinstance(widget, AlignWidget)
    assert widget.image.value is source and (widget.first.value, widget.last.value) == (0, 7)
    widget.first.value, widget.last.value = 4, 7
    worker = widget.start()
    assert not widget.run.enabled
    turns = _wait(worker)
    assert turns > 3  # the viewer kept handling events while the sections were aligned
    assert widget.run.enabled and widget.status.value.startswith("aligned sections 4..7")
    assert widget.progress.value == widget.progress.max >= 4
    aligned = viewer.layers["raw aligned"]
    assert aligned.data.shape == (4, 128, 128)
    assert tuple(aligned.scale) == VOXEL and tuple(aligned.translate) == (4 * VOXEL[0], 0.0, 0.0)
    before = np.median(adjacent_correlation(stack[4:8, :128, :128]))
    assert np.median(adjacent_correlation(aligned.data)) > before + 0.2
    assert tuple(viewer.layers["raw field vectors"].translate) == (4 * VOXEL[0], 0.0, 0.0)


def _shows_whole_images(picture: np.ndarray) -> bool:
    """True if an RGB(A) screenshot holds textured images with background around them: not an empty
    canvas, and not one image zoomed in to fill it."""
    gray = picture[..., :3].astype(np.float32).mean(-1)
    textured = (gray > 20).mean() > 0.1 and gray.std() > 20 and len(np.unique(gray.astype(np.uint8))) > 64
    return bool(textured and (gray < 5).mean() > 0.05)


@pytest.mark.e2e
def test_emalign_view_shows_aligned_raw_and_fields_side_by_side_with_a_linked_xz_window(display, output, tmp_path):
    from emalign.napari.view import XZ_ORDER, _grid, open_views

    xy, xz = open_views(output)
    try:
        grid = _grid(xy)
        cells = {name: grid.position(xy.layers.index(name), xy.layers) for name in ("aligned", "raw", "field |u| px")}
        assert grid.enabled and sorted(cells.values()) == [(0, 0), (0, 1), (0, 2)]
        assert cells["aligned"] == grid.position(xy.layers.index("QC flags (aligned)"), xy.layers)
        assert tuple(xz.dims.order) == XZ_ORDER and tuple(xz.dims.displayed) == (0, 2)
        xy.dims.set_current_step(0, 5)
        assert xz.dims.current_step[0] == 5
        xz.dims.set_current_step(1, 100)
        assert xy.dims.current_step[1] == 100 and "y = 400" in xz.title
        xz.layers["aligned"].contrast_limits = (10.0, 200.0)
        assert tuple(xy.layers["raw"].contrast_limits) == (10.0, 200.0)
        for name, viewer in (("xy", xy), ("xz", xz)):
            picture = viewer.screenshot(str(tmp_path / f"{name}.png"), canvas_only=True, flash=False)
            assert (tmp_path / f"{name}.png").stat().st_size > 10_000
            assert _shows_whole_images(picture), f"the {name} window shows a blank or zoomed-in canvas"
    finally:
        xy.close()
        xz.close()
