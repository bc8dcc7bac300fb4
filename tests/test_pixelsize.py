"""Pixel size: units, plausibility, the working resolution, the texture estimate, and the pipeline that
aligns at the working resolution and renders at full resolution."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from helpers import one_line_error
from scipy import ndimage

from emalign.errors import EmalignError
from emalign.io import downsampled, import_stack, open_stack
from emalign.metrics import adjacent_correlation
from emalign.pipeline import AlignParams, align, store
from emalign.pipeline.store import Workspace, stack_resolution, working_stack
from emalign.pixelsize import (
    check_pixel_size,
    estimate_pixel_size,
    to_nanometres,
    working_resolution,
)
from emalign.shared_data import FLYEM, SHARED_DATA, shared_stack
from emalign.synth import demo_stack, em_texture

RUN = {"scheduler_spec": "sync", "device": "cpu", "progress": False}


def zoomed(stack: np.ndarray, factor: float) -> np.ndarray:
    return np.stack([np.clip(ndimage.zoom(s.astype(np.float32), factor, order=3), 0, 255) for s in stack]).astype(
        np.uint8
    )


def write_calibrated(path, stack: np.ndarray, pixel: float, unit: str = "nm", spacing: float = 40.0) -> None:
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(1 / pixel, 1 / pixel), metadata={"spacing": spacing, "unit": unit}
    )


@pytest.mark.parametrize(
    ("value", "unit", "nm"), [(4, "nanometer", 4.0), (0.005, "micrometer", 5.0), (4, "nm", 4.0), (0.004, "um", 4.0)]
)
def test_lengths_convert_to_nanometres_from_ngff_units_and_abbreviations(value, unit, nm):
    assert to_nanometres(value, unit) == pytest.approx(nm)


def test_an_unknown_unit_is_a_one_line_error():
    with pytest.raises(EmalignError, match="parsec"):
        to_nanometres(1.0, "parsec")


@pytest.mark.parametrize("nm", [0.0, -4.0, float("nan"), float("inf"), 1e9, 0.01])
def test_implausible_pixel_sizes_are_refused_naming_where_they_came_from(nm):
    message = one_line_error("stack.tif", check_pixel_size, nm, "stack.tif")
    assert "--voxel-size" in message


@pytest.mark.parametrize(
    ("nm", "factor", "ratio"), [(10, 1, 1.0), (5, 2, 1.0), (4, 2, 0.8), (2.5, 4, 1.0), (8, 1, 0.8), (20, 1, 2.0)]
)
def test_the_working_resolution_is_the_integer_factor_nearest_the_training_pixel(nm, factor, ratio):
    resolution = working_resolution(nm, "metadata")
    assert (resolution.factor, resolution.ratio) == (factor, pytest.approx(ratio))


def test_an_estimated_pixel_size_sets_the_factor_only():
    assert working_resolution(4.3, "estimated").ratio == 1.0
    assert working_resolution(4.3, "estimated").factor == 2


def test_the_texture_estimate_doubles_when_the_sections_are_upsampled_twice():
    sections = em_texture((3, 192, 192), seed=2, z_step=4.0)
    fine = estimate_pixel_size(list(zoomed(sections, 2.0)))
    coarse = estimate_pixel_size(list(sections))
    assert coarse / fine == pytest.approx(2.0, rel=0.15)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data (FlyEM sections)")
def test_the_texture_estimate_reads_flyem_at_10_5_and_4_nm_within_20_percent():
    sections = shared_stack(FLYEM[1], z_step=20)[:5]
    for factor in (1.0, 2.0, 2.5):
        assert estimate_pixel_size(list(zoomed(sections, factor))) == pytest.approx(10.0 / factor, rel=0.2)


def test_block_means_downsample_a_stack_lazily_with_its_voxel_size(tmp_path):
    stack = np.arange(2 * 7 * 9, dtype=np.uint16).reshape(2, 7, 9)
    write_calibrated(tmp_path / "s.tif", stack, 5.0)
    down = downsampled(open_stack(tmp_path / "s.tif"), 2)
    expected = stack[:, :6, :8].reshape(2, 3, 2, 4, 2).mean((2, 4))
    assert down.shape == (2, 3, 4) and down.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(down.data), np.rint(expected))
    assert down.voxel_size == pytest.approx((40.0, 10.0, 10.0))


def test_voxel_size_comes_from_the_user_then_the_metadata_then_the_texture(tmp_path):
    stack = demo_stack((4, 64, 64), seed=0)[1].stack
    write_calibrated(tmp_path / "calibrated.tif", stack, 0.005, unit="um", spacing=0.04)
    tifffile.imwrite(tmp_path / "bare.tif", stack)
    calibrated, bare = open_stack(tmp_path / "calibrated.tif"), open_stack(tmp_path / "bare.tif")
    user = stack_resolution(calibrated, AlignParams(voxel_size=(50.0, 4.0, 4.0)))
    assert (user[0].source, user[0].pixel_nm, user[1], user[2]) == ("user", 4.0, (50.0, 4.0, 4.0), "nanometer")
    found = stack_resolution(calibrated, AlignParams())
    assert (found[0].source, found[0].pixel_nm, found[0].factor) == ("metadata", pytest.approx(5.0), 2)
    guessed = stack_resolution(bare, AlignParams())
    assert guessed[0].source == "estimated" and guessed[0].factor == 1
    assert guessed[1:] == ((1.0, 1.0, 1.0), "nanometer")  # the output repeats the input's metadata


def test_a_resumed_output_keeps_the_pixel_size_estimated_when_it_was_created_without_reading_again(
    tmp_path, monkeypatch
):
    tifffile.imwrite(tmp_path / "bare.tif", demo_stack((4, 64, 64), seed=0)[1].stack)
    stack, params = open_stack(tmp_path / "bare.tif"), AlignParams()
    first = Workspace.create(stack, tmp_path / "out.zarr", params).resolution
    calls = []
    monkeypatch.setattr(store, "estimate_pixel_size", lambda crops: calls.append(crops) or 2 * first.pixel_nm)
    assert Workspace.create(stack, tmp_path / "out.zarr", params).resolution == first and not calls
    assert Workspace.create(stack, tmp_path / "new.zarr", params).resolution.pixel_nm == 2 * first.pixel_nm


def test_an_absurd_voxel_size_in_the_metadata_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "metres.tif"
    write_calibrated(path, demo_stack((4, 64, 64), seed=0)[1].stack, 0.004, unit="mm")  # 4 um pixels
    one_line_error(path, align, path, tmp_path / "out.zarr", AlignParams(), **RUN)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("voxel_size", [(-40.0, 10.0, 10.0), (0.0, 10.0, 10.0), (40.0, 10.0, float("nan"))])
def test_a_spacing_that_is_not_positive_is_a_one_line_error_from_the_user_or_the_metadata(tmp_path, voxel_size):
    stack = demo_stack((4, 64, 64), seed=0)[1].stack
    tifffile.imwrite(tmp_path / "bare.tif", stack)
    with pytest.raises(EmalignError, match="every spacing must be a positive number"):
        stack_resolution(open_stack(tmp_path / "bare.tif"), AlignParams(voxel_size=voxel_size))
    import_stack(tmp_path / "bare.tif", tmp_path / "s.zarr", voxel_size=(40, 10, 10), levels=1, progress=False)
    attrs = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    ome = dict(attrs.attrs["ome"])
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = list(voxel_size)
    attrs.attrs["ome"] = ome
    with pytest.raises(EmalignError, match="s.zarr: metadata: .*every spacing must be a positive number"):
        stack_resolution(open_stack(tmp_path / "s.zarr"), AlignParams())


@pytest.mark.e2e
def test_a_5_nm_stack_is_aligned_at_2x_block_means_and_rendered_at_full_resolution(tmp_path):
    _, misaligned = demo_stack((8, 96, 96), seed=1)
    fine = zoomed(misaligned.stack, 2.0)
    write_calibrated(tmp_path / "fine.tif", fine, 5.0)
    params = AlignParams(block=4, polish="off")
    ws, _, _ = align(tmp_path / "fine.tif", tmp_path / "fine.zarr", params, **RUN)
    assert ws.factor == 2 and ws.plan.shape == (8, 96, 96)
    group = zarr.open_group(str(tmp_path / "fine.zarr"), mode="r")
    assert group["0"].shape == fine.shape
    assert group.attrs["emalign"]["resolution"] == {"pixel_nm": 5.0, "source": "metadata", "factor": 2, "ratio": 1.0}
    scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([40.0, 5.0, 5.0])
    # the work is that of the block means given at 10 nm pixels
    write_calibrated(tmp_path / "means.tif", np.asarray(ws.working_stack().data), 10.0)
    means, _, _ = align(tmp_path / "means.tif", tmp_path / "means.zarr", params, **RUN)
    assert means.factor == 1
    np.testing.assert_array_equal(ws.array("fields/global")[:], means.array("fields/global")[:])
    aligned = np.asarray(group["0"][:])
    assert adjacent_correlation(aligned).mean() > adjacent_correlation(fine).mean() + 0.3


def test_the_working_stack_is_the_inputs_own_pyramid_level_where_it_has_the_block_means_shape(tmp_path):
    stack = em_texture((2, 128, 128), seed=1, z_step=4.0)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    import_stack(tmp_path / "s.tif", tmp_path / "s.zarr", voxel_size=(40, 5, 5), unit="nm", levels=2, progress=False)
    imported = open_stack(tmp_path / "s.zarr")
    assert working_stack(imported, 2).level == 1
    assert working_stack(imported, 4).level == 0  # no level 2: block means of level 0
    assert working_stack(imported, 4).shape == (2, 32, 32)
