"""Pixel sizes end to end: the input's voxel size and unit reach every pyramid level of `import` and `align`
outputs, and the NGFF metadata (built by :mod:`emalign.ngff`) validates with ome-zarr-models (0.5 and 0.4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from helpers import one_line_error

from emalign.evaluate import write_tiff
from emalign.io import OmeZarrWriter, import_stack, open_stack
from emalign.ngff import image_attrs
from emalign.pipeline import AlignParams, align
from emalign.synth import demo_stack

RUN = {"scheduler_spec": "sync", "device": "cpu", "progress": False}


def validated(out: Path, ngff: str):
    """The multiscale of the NGFF image at ``out`` parsed by ome-zarr-models (its 0.5 or 0.4 Image model: raises
    if invalid)."""
    from ome_zarr_models import v04, v05

    image = (v05 if ngff == "0.5" else v04).Image.from_zarr(zarr.open_group(str(out), mode="r"))
    return (image.attributes.ome if ngff == "0.5" else image.attributes).multiscales[0]


def level_voxels(out: Path) -> list[tuple[tuple[float, float, float], str]]:
    """(voxel size, unit) of every pyramid level of the OME-Zarr at ``out``, as :func:`open_stack` reads them."""
    image = zarr.open_group(str(out), mode="r").attrs
    count = len((image.get("ome") or image)["multiscales"][0]["datasets"])
    return [(open_stack(out, level=level).voxel_size, open_stack(out, level=level).unit) for level in range(count)]


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_import_carries_the_tiff_calibration_and_its_unit_into_every_level(tmp_path, ngff):
    src = tmp_path / "um.tif"
    data = np.arange(3 * 40 * 48, dtype=np.uint16).reshape(3, 40, 48)
    tifffile.imwrite(
        src, data, imagej=True, resolution=(1 / 0.008, 1 / 0.008), metadata={"spacing": 0.05, "unit": "um"}
    )
    out = tmp_path / "um.zarr"
    import_stack(src, out, (1, 16, 16), levels=3, progress=False, ngff=ngff)
    multiscale = validated(out, ngff)
    assert [axis.unit for axis in multiscale.axes] == ["micrometer"] * 3
    assert level_voxels(out) == [
        ((0.05, pytest.approx(0.008 * 2**level), pytest.approx(0.008 * 2**level)), "micrometer") for level in range(3)
    ]


def test_align_carries_the_input_voxel_size_into_every_level_of_the_output(tmp_path):
    _, misaligned = demo_stack((6, 64, 64), seed=2)
    src = tmp_path / "calibrated.tif"
    write_tiff(src, misaligned.stack, (40.0, 8.0, 8.0))
    assert open_stack(src).voxel_size == pytest.approx((40.0, 8.0, 8.0))
    out = tmp_path / "aligned.zarr"
    align(src, out, AlignParams(block=3, polish="off", tile=64, halo=16), **RUN)
    validated(out, "0.5")
    levels = level_voxels(out)
    assert len(levels) == 1  # 64 px sections need no pyramid: one level at the input's voxel size
    assert levels == [((40.0, pytest.approx(8.0), pytest.approx(8.0)), "nanometer")]
    assert zarr.open_group(str(out), mode="r").attrs["emalign"]["resolution"]["source"] == "metadata"


def test_writer_levels_double_the_pixel_and_shift_by_half_the_pixels_they_average(tmp_path):
    out = tmp_path / "levels.zarr"
    OmeZarrWriter.create(out, (2, 64, 64), np.uint8, (30.0, 5.0, 6.0), "nanometer", levels=3, ngff="0.4")
    datasets = validated(out, "0.4").datasets
    assert [list(d.coordinateTransformations[0].scale) for d in datasets] == [
        [30.0, 5.0, 6.0],
        [30.0, 10.0, 12.0],
        [30.0, 20.0, 24.0],
    ]
    assert [list(d.coordinateTransformations[1].translation) for d in datasets] == [
        [0.0, 0.0, 0.0],
        [0.0, 2.5, 3.0],
        [0.0, 7.5, 9.0],
    ]


def test_a_voxel_size_the_ngff_schema_refuses_is_a_one_line_error_and_writes_nothing(tmp_path):
    out = tmp_path / "bad.zarr"
    one_line_error(
        out, OmeZarrWriter.create, out, (2, 8, 8), np.uint8, (40, -4, 4), levels=2, match="NGFF 0.5 metadata"
    )
    assert not out.exists()
    assert image_attrs("x", (40.0, 4.0, 4.0), "nanometer", 1, "0.4")["multiscales"][0]["version"] == "0.4"
