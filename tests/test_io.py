"""Reading stacks (TIFF, Zarr, OME-Zarr), input validation, and the resumable OME-Zarr writer."""

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from helpers import one_line_error

from emalign import inflate, io
from emalign.io import OmeZarrWriter, check_chunk, create_array, import_stack, is_complete, open_stack

RNG = np.random.default_rng(0)


def ramp(shape: tuple[int, ...], dtype=np.uint16) -> np.ndarray:
    return (np.arange(np.prod(shape)) % np.iinfo(dtype).max).astype(dtype).reshape(shape)


def zarr_array(path: Path, data: np.ndarray, zarr_format: int = 2, chunks=(1, 8, 8)) -> Path:
    array = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, zarr_format=zarr_format)
    array[...] = data
    return path


def write_ome_zarr(path: Path, levels: list[np.ndarray], version: str, axes: str, voxel=(40.0, 4.0, 4.0)) -> None:
    """A hand-written OME-Zarr image: NGFF 0.4 (zarr v2, top-level attrs) or 0.5 (zarr v3, attrs["ome"])."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    datasets = []
    for level, data in enumerate(levels):
        group.create_array(str(level), shape=data.shape, chunks=data.shape, dtype=data.dtype)[...] = data
        scale = [1.0] * (len(axes) - 3) + [voxel[0], voxel[1] * 2**level, voxel[2] * 2**level]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    kinds = {"t": "time", "c": "channel"}
    multiscales = {
        "version": version,
        "axes": [
            {"name": a, "type": kinds.get(a, "space"), **({} if a in kinds else {"unit": "nanometer"})} for a in axes
        ],
        "datasets": datasets,
    }
    group.attrs.update(
        {"multiscales": [multiscales]}
        if version == "0.4"
        else {"ome": {"version": version, "multiscales": [multiscales]}}
    )


TIFF_CASES = {
    "contiguous": ({}, "_read_raw_region"),
    "big-endian": ({"byteorder": ">"}, "_read_raw_region"),
    "compressed": ({"compression": "zlib"}, "_read_page_region"),
    "tiled": ({"tile": (16, 16)}, "_read_page_region"),
    "big-endian-tiled": ({"tile": (16, 16), "compression": "zlib", "byteorder": ">"}, "_read_page_region"),
    "sections-as-planes-of-one-page": (
        {"photometric": "rgb", "planarconfig": "separate", "compression": "zlib"},
        "_read_tiff_section",
    ),
}


@pytest.mark.parametrize("case", TIFF_CASES)
def test_open_tiff_stack_is_lazy_and_matches(tmp_path, monkeypatch, case):
    kwargs, reader = TIFF_CASES[case]
    data = ramp((3, 30, 40), np.uint8 if "planes" in case else np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, **{"photometric": "minisblack", **kwargs})
    calls = []
    original = getattr(io, reader)
    monkeypatch.setattr(io, reader, lambda *args: calls.append(args[-3]) or original(*args))

    stack = open_stack(path)
    assert isinstance(stack.data, da.Array) and stack.data.numblocks == (3, 1, 1)
    assert calls == []  # opening reads headers only
    np.testing.assert_array_equal(check_chunk(stack, 2), data[2])
    assert calls == [2]
    np.testing.assert_array_equal(stack.data.compute(), data)
    assert stack.data.dtype == data.dtype and stack.voxel_size == (1.0, 1.0, 1.0) and stack.unit == "nanometer"


LARGE_SECTION_LAYOUTS = {  # how a TIFF stores its sections -> the chunks (y, x) it is read in at DASK_XY = 64
    "strips": ({"compression": "zlib", "rowsperstrip": 8}, (16, 200)),
    "tiles": ({"compression": "zlib", "tile": (16, 32)}, (64, 64)),
    "uncompressed": ({}, (64, 64)),
    "folder-of-tiled-files": ({"compression": "zlib", "tile": (32, 32)}, (64, 64)),
}


def write_layout(path: Path, data: np.ndarray, layout: str) -> Path:
    """``data`` as a multi-page TIFF at ``path`` (a folder of one-section files for the folder layout)."""
    kwargs = {"photometric": "minisblack", **LARGE_SECTION_LAYOUTS[layout][0]}
    if not layout.startswith("folder"):
        tifffile.imwrite(path, data, **kwargs)
        return path
    path.mkdir()
    for z, section in enumerate(data):
        tifffile.imwrite(path / f"s{z}.tif", section, **kwargs)
    return path


@pytest.mark.parametrize("layout", LARGE_SECTION_LAYOUTS)
def test_a_tiff_is_chunked_in_whole_strips_or_tiles_and_a_part_reads_only_those_it_covers(
    tmp_path, monkeypatch, layout
):
    monkeypatch.setattr(io, "DASK_XY", 64)
    data = RNG.integers(0, 65535, (3, 150, 200), dtype=np.uint16)  # incompressible: bytes read ~ pixels decoded
    stack = open_stack(write_layout(tmp_path / "stack.tif", data, layout))
    assert stack.data.chunksize[1:] == LARGE_SECTION_LAYOUTS[layout][1]
    check_chunk(stack, 1, region=(slice(0, 1), slice(0, 1)))  # opens (and keeps open) the file: its headers read
    read = []
    unpatched = tifffile.FileHandle.read
    monkeypatch.setattr(tifffile.FileHandle, "read", lambda fh, size=-1: read.append(size) or unpatched(fh, size))
    region = (slice(40, 60), slice(70, 100))
    np.testing.assert_array_equal(check_chunk(stack, 1, region=region), data[1][region])
    # the pixels of the strips or tiles the part covers, of the section's 30000 (and of the dask chunks' 4096 to
    # 6400); an uncompressed page is mapped, not read
    covered = {"strips": 3 * 8 * 200, "tiles": 4 * 16 * 32, "uncompressed": 0, "folder-of-tiled-files": 2 * 32 * 32}
    assert (covered[layout] > 0) == (sum(read) > 0) and sum(read) <= 1.1 * covered[layout] * data.itemsize
    np.testing.assert_array_equal(stack.data.compute(), data)


COMPRESSIONS = {  # how labs' tools save TIFFs (tifffile arguments), read through imagecodecs
    "lzw-strips-with-predictor": {"compression": "lzw", "predictor": True, "rowsperstrip": 8},
    "packbits-strips": {"compression": "packbits", "rowsperstrip": 8},
    "jpeg-tiles": {"compression": "jpeg", "tile": (32, 32)},
    "zstd-tiles": {"compression": "zstd", "tile": (32, 32)},
    "jpeg2000-tiles": {"compression": "jpeg2000", "tile": (32, 32)},
}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_tiff_in_a_common_compression_is_read_in_parts_as_tifffile_decodes_it_whole(tmp_path, compression):
    data = ramp((2, 70, 90), np.uint8) // 3 + RNG.integers(0, 40, (2, 70, 90), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack", **COMPRESSIONS[compression])
    whole = tifffile.imread(path)  # jpeg is lossy: the reference is tifffile's own decode
    stack = open_stack(path)
    region = (slice(20, 45), slice(33, 70))
    np.testing.assert_array_equal(check_chunk(stack, 1, region=region), whole[1][region])
    np.testing.assert_array_equal(stack.data.compute(), whole)


def test_a_folder_of_lzw_tiffs_saved_by_pillow_is_read(tmp_path):
    image = pytest.importorskip("PIL.Image")
    data = RNG.integers(0, 255, (3, 40, 50), dtype=np.uint8)
    for z, section in enumerate(data):
        image.fromarray(section).save(tmp_path / f"s{z}.tif", compression="tiff_lzw")
    np.testing.assert_array_equal(open_stack(tmp_path).data.compute(), data)


@pytest.mark.parametrize(
    "options",
    [{}, {"predictor": True, "byteorder": ">"}, {"predictor": True, "rowsperstrip": 90}],
    ids=["one-strip", "one-strip-big-endian-with-predictor", "two-strips-with-predictor"],
)
def test_a_large_deflate_strip_is_read_by_its_rows_from_the_nearest_saved_decoder_state(tmp_path, monkeypatch, options):
    monkeypatch.setattr(io, "INFLATED_STRIP_BYTES", 4096)
    monkeypatch.setattr(io, "DASK_XY", 64)
    monkeypatch.setattr(inflate, "STATE_EVERY", 2000)
    monkeypatch.setattr(inflate, "READ_BYTES", 256)
    monkeypatch.setattr(inflate, "_states", type(inflate._states)())
    data = RNG.integers(0, 65535, (2, 150, 200), dtype=np.uint16)  # incompressible: bytes read ~ bytes decoded
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib", **{"rowsperstrip": 150, **options})
    stack = open_stack(path)
    assert stack.data.chunksize[1:] == (20, 200)  # bands of about DASK_XY^2 px, not whole strips
    np.testing.assert_array_equal(stack.data.compute(), data)  # the first pass saves the decoder's states
    check_chunk(stack, 1, region=(slice(0, 1), slice(0, 1)))  # opens (and keeps open) the file in this thread
    read = []
    unpatched = tifffile.FileHandle.read
    monkeypatch.setattr(tifffile.FileHandle, "read", lambda fh, size=-1: read.append(size) or unpatched(fh, size))
    region = (slice(80, 85), slice(70, 100))
    np.testing.assert_array_equal(check_chunk(stack, 1, region=region), data[1][region])
    # 5 rows of 400 bytes, decoded from the state saved at most 2000 bytes before (of the strip's 60000 or 36000)
    assert 0 < sum(read) <= 1.1 * (5 * 400 + 2000) + 256


def test_a_corrupt_deflate_strip_is_a_one_line_error_naming_the_section(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "INFLATED_STRIP_BYTES", 4096)
    data = RNG.integers(0, 255, (2, 150, 200), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib", rowsperstrip=150)
    with tifffile.TiffFile(path) as tif:
        middle = tif.pages[1].dataoffsets[0] + tif.pages[1].databytecounts[0] // 2
    with open(path, "r+b") as handle:
        handle.seek(middle)
        handle.write(bytes(200))
    stack = open_stack(path)
    np.testing.assert_array_equal(check_chunk(stack, 1, region=(slice(0, 10), slice(0, 200))), data[1, :10])
    one_line_error(path, check_chunk, stack, 1, match="section 1 could not be read .*Deflate")


OME_TWO_FILES = """<?xml version="1.0" encoding="UTF-8"?>
<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" UUID="{own}">
<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" SizeX="40" SizeY="30" SizeZ="4"
 SizeC="1" SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>
<TiffData FirstZ="0" IFD="0" PlaneCount="2"><UUID FileName="a.ome.tif">urn:uuid:{a}</UUID></TiffData>
<TiffData FirstZ="2" IFD="0" PlaneCount="2"><UUID FileName="b.ome.tif">urn:uuid:{b}</UUID></TiffData>
</Pixels></Image></OME>"""


def test_a_multi_file_ome_tiff_reads_each_section_from_the_file_that_holds_it(tmp_path):
    data = RNG.integers(0, 255, (4, 30, 40), dtype=np.uint8)
    ids = {"a": "0" * 8 + "-0000-4000-8000-" + "0" * 11 + "a", "b": "0" * 8 + "-0000-4000-8000-" + "0" * 11 + "b"}
    for name, part in (("a", data[:2]), ("b", data[2:])):
        with tifffile.TiffWriter(tmp_path / f"{name}.ome.tif") as writer:
            for i, section in enumerate(part):
                description = OME_TWO_FILES.format(own=f"urn:uuid:{ids[name]}", **ids) if i == 0 else None
                writer.write(
                    section, photometric="minisblack", compression="zlib", metadata=None, description=description
                )
    stack = open_stack(tmp_path / "a.ome.tif")
    np.testing.assert_array_equal(check_chunk(stack, 3, region=(slice(3, 9), slice(4, 20))), data[3, 3:9, 4:20])
    np.testing.assert_array_equal(stack.data.compute(), data)


def test_a_tiff_rewritten_after_a_read_is_read_as_it_now_is(tmp_path):
    path = tmp_path / "stack.tif"
    first, second = ramp((2, 40, 30), np.uint8), ramp((2, 40, 30), np.uint8)[:, ::-1]
    tifffile.imwrite(path, first, photometric="minisblack", compression="zlib", tile=(16, 16))
    np.testing.assert_array_equal(
        check_chunk(open_stack(path), 1, region=(slice(0, 20), slice(0, 20))), first[1, :20, :20]
    )
    tifffile.imwrite(path, second, photometric="minisblack", compression="zlib", rowsperstrip=4)  # the file kept open
    np.testing.assert_array_equal(
        check_chunk(open_stack(path), 1, region=(slice(0, 20), slice(0, 20))), second[1, :20, :20]
    )


def test_open_tiff_reads_imagej_calibration(tmp_path):
    path = tmp_path / "calibrated.tif"
    tifffile.imwrite(
        path, ramp((3, 8, 8), np.uint8), imagej=True, resolution=(0.25, 0.25), metadata={"spacing": 40.0, "unit": "nm"}
    )
    stack = open_stack(path)
    assert stack.voxel_size == pytest.approx((40.0, 4.0, 4.0)) and stack.unit == "nanometer"


def test_open_tiff_folder_sorts_naturally(tmp_path):
    for index in (10, 2, 1):
        tifffile.imwrite(tmp_path / f"s{index}.tif", np.full((6, 7), index, np.uint8))
    (tmp_path / "notes.txt").write_text("not a section")
    stack = open_stack(tmp_path)
    assert stack.shape == (3, 6, 7) and stack.data.numblocks == (3, 1, 1)
    np.testing.assert_array_equal(stack.data[:, 0, 0].compute(), [1, 2, 10])


@pytest.mark.parametrize(
    ("numbers", "note"),
    [
        ([1, 2, 4, 5, 9], "the file numbers skip 3, 6, 7, 8 (4 missing); a gap's two sides are aligned as neighbours"),
        ([0, 40, 80, 160], "the file numbers skip 120 (1 missing)"),  # z in nm: counted in steps of 40
        ([0, 40, 80, 120], ""),
        ([20230101120000, 20230101120517, 20230101121003], ""),  # times, not section numbers
    ],
)
def test_a_folder_whose_file_numbers_skip_says_which_are_missing(tmp_path, numbers, note):
    for number in numbers:
        tifffile.imwrite(tmp_path / f"sec_{number:04d}.tif", np.full((6, 7), 1, np.uint8))
    stack = open_stack(tmp_path)
    assert stack.shape == (len(numbers), 6, 7)
    assert (note in stack.layout and stack.layout.startswith(str(tmp_path))) if note else stack.layout == ""


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_zarr_v2_and_v3_arrays(tmp_path, zarr_format):
    data = ramp((4, 20, 24), np.uint8)
    stack = open_stack(zarr_array(tmp_path / "raw.zarr", data, zarr_format))
    assert isinstance(stack.data, da.Array) and stack.level == 0
    np.testing.assert_array_equal(stack.data.compute(), data)
    assert stack.voxel_size == (1.0, 1.0, 1.0) and stack.unit == "nanometer"


def test_open_zarr_array_inside_group_by_dataset(tmp_path):
    path = tmp_path / "group.zarr"
    zarr.open_group(str(path), mode="w").create_array("raw", shape=(2, 8, 8), dtype=np.uint8)[...] = 7
    assert open_stack(path, dataset="raw").data.compute().max() == 7
    assert "raw" in one_line_error(path, open_stack, path, match="without OME-Zarr multiscales")
    one_line_error(path, open_stack, path, dataset="missing", match="no array or group 'missing'")


@pytest.mark.parametrize(("version", "axes"), [("0.4", "tczyx"), ("0.5", "zyx")])
def test_open_ome_zarr_level_and_voxel_size(tmp_path, version, axes):
    full = ramp((3, 16, 20), np.uint8)
    levels = [full, full[:, ::2, ::2]]
    path = tmp_path / "image.zarr"
    write_ome_zarr(path, [level.reshape((1,) * (len(axes) - 3) + level.shape) for level in levels], version, axes)

    stack = open_stack(path, level=1)
    assert stack.shape == (3, 8, 10) and stack.level == 1
    assert stack.voxel_size == (40.0, 8.0, 8.0) and stack.unit == "nanometer"
    np.testing.assert_array_equal(stack.data.compute(), levels[1])
    assert open_stack(path).voxel_size == (40.0, 4.0, 4.0)
    one_line_error(path, open_stack, path, level=2, match="level 2 out of range")


def test_2d_input_is_a_clear_error(tmp_path):
    tif = tmp_path / "section.tif"
    tifffile.imwrite(tif, np.zeros((8, 9), np.uint8))
    one_line_error(tif, open_stack, tif, match=r"is 2D \(Y, X\).*expected a 3D stack \(Z, Y, X\)")
    array = zarr_array(tmp_path / "section.zarr", np.zeros((8, 9), np.uint8), chunks=(8, 9))
    one_line_error(array, open_stack, array, match=r"is 2D \(Y, X\)")


def test_4d_multichannel_is_a_clear_error(tmp_path):
    channels = zarr_array(tmp_path / "channels.zarr", np.zeros((3, 2, 8, 8), np.uint8), chunks=(1, 1, 8, 8))
    one_line_error(channels, open_stack, channels, match="more than one channel")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((3, 8, 8, 3), np.uint8), photometric="rgb")
    one_line_error(rgb, open_stack, rgb, match="more than one channel")
    single = zarr_array(tmp_path / "single.zarr", ramp((3, 1, 8, 8), np.uint8), chunks=(1, 1, 8, 8))
    np.testing.assert_array_equal(open_stack(single).data.compute(), ramp((3, 8, 8), np.uint8))


def test_empty_stack_error(tmp_path):
    empty = zarr_array(tmp_path / "empty.zarr", np.zeros((0, 8, 8), np.uint8))
    one_line_error(empty, open_stack, empty, match="is empty")
    folder = tmp_path / "nothing"
    folder.mkdir()
    one_line_error(folder, open_stack, folder, match="not a recognised stack")


def test_non_numeric_dtype_error(tmp_path):
    mask = zarr_array(tmp_path / "mask.zarr", np.zeros((2, 8, 8), bool))
    one_line_error(mask, open_stack, mask, match="has dtype bool")
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    one_line_error(text, open_stack, text, match="not a recognised stack")


def test_a_tiff_folder_of_sections_of_different_types_is_a_one_line_error(tmp_path):
    tifffile.imwrite(tmp_path / "a1.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "a2.tif", np.zeros((8, 8), np.uint16))
    message = one_line_error(tmp_path, open_stack, tmp_path, match="differ in type")
    assert "a1.tif" in message and "a2.tif" in message


SIZES = [(40, 50), (40, 50), (47, 56), (33, 50)]  # (y, x) of each section; the canvas: (47, 56)


def placed(section: np.ndarray, canvas=(47, 56)) -> np.ndarray:
    """``section`` centred on a zero canvas, as a stack of sections of several sizes reads it."""
    out = np.zeros(canvas, section.dtype)
    dy, dx = ((c - s) // 2 for c, s in zip(canvas, section.shape, strict=True))
    out[dy : dy + section.shape[0], dx : dx + section.shape[1]] = section
    return out


@pytest.mark.parametrize("layout", ["folder", "one-file"])
def test_sections_of_several_sizes_are_centred_on_the_smallest_common_canvas_in_order(tmp_path, layout):
    sections = [RNG.integers(1, 255, size, dtype=np.uint8) for size in SIZES]
    path = tmp_path / ("sections" if layout == "folder" else "stack.tif")
    if layout == "folder":
        path.mkdir()
        for z, section in enumerate(sections):
            tifffile.imwrite(path / f"s{z}.tif", section, compression="zlib", tile=(16, 16))
    else:  # tifffile groups pages by size: series 0 is pages 0, 1 (and 3 would follow in a generic series)
        with tifffile.TiffWriter(path) as writer:
            for section in sections:
                writer.write(section, photometric="minisblack", metadata=None, compression="zlib", rowsperstrip=8)
    stack = open_stack(path)
    assert stack.shape == (4, 47, 56) and "sections of 3 sizes centred on a 47 x 56 canvas" in stack.layout
    np.testing.assert_array_equal(stack.data.compute(), [placed(section) for section in sections])
    region = (slice(5, 30), slice(2, 40))  # crosses the margins of sections 0, 1 and 3
    for z, section in enumerate(sections):
        np.testing.assert_array_equal(check_chunk(stack, z, region=region), placed(section)[region])


def test_a_tiff_of_pages_written_one_at_a_time_is_all_its_pages_and_leaves_thumbnails_out(tmp_path):
    data = RNG.integers(0, 65535, (5, 30, 40), dtype=np.uint16)
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as writer:  # tifffile makes each write a series of its own
        for section in data:
            writer.write(section, photometric="minisblack", compression="zlib")
        writer.write(data[0, ::4, ::4], photometric="minisblack")  # a thumbnail
        writer.write(data[0, ::2, ::2], photometric="minisblack")  # a half-size level not marked as one
        writer.write(np.zeros((30, 40, 3), np.uint8), photometric="rgb")  # a colour overview
    stack = open_stack(path)
    assert stack.shape == (5, 30, 40) and stack.layout == (
        f"{path}: its 5 pages in 8 series taken as the sections, in file order; 3 other page(s) left out "
        "(thumbnails, colour or another type)"
    )
    np.testing.assert_array_equal(stack.data.compute(), data)
    np.testing.assert_array_equal(check_chunk(stack, 3, region=(slice(10, 20), slice(5, 9))), data[3, 10:20, 5:9])
    assert stack.locate(3) == "stack.tif, page 3"
    one_line_error(path, open_stack, path, level=1, match="sections are single pages: only level 0")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, data, photometric="minisblack")  # one series: the stack, as before
    assert open_stack(plain).layout == "" and open_stack(plain).shape == (5, 30, 40)


def test_missing_path_error(tmp_path):
    missing = tmp_path / "no-such-stack.zarr"
    one_line_error(missing, open_stack, missing, match="does not exist")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_corrupt_chunk_names_section(tmp_path, zarr_format):
    path = zarr_array(tmp_path / "raw.zarr", ramp((3, 8, 8)), zarr_format)
    chunk = path / ("2.0.0" if zarr_format == 2 else "c/2/0/0")
    chunk.write_bytes(b"not a blosc or zstd frame")
    stack = open_stack(path)
    np.testing.assert_array_equal(check_chunk(stack, 1), ramp((3, 8, 8))[1])
    one_line_error(path, check_chunk, stack, 2, match=r"section 2 could not be read \(")


def test_non_finite_section_is_named(tmp_path):
    data = np.ones((3, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    stack = open_stack(zarr_array(tmp_path / "float.zarr", data))
    one_line_error(stack.path, check_chunk, stack, 1, match="section 1 has 1 NaN or infinite")
    assert np.isnan(check_chunk(stack, 1, require_finite=False)).sum() == 1


def validate_ngff(out: Path, ngff: str) -> None:
    """Validate an OME-Zarr image with ome-zarr-models (its NGFF 0.5 or 0.4 Image model)."""
    from ome_zarr_models import v04, v05

    image = (v05 if ngff == "0.5" else v04).Image.from_zarr(zarr.open_group(str(out), mode="r"))
    assert image.attributes


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_writer_pyramid_and_metadata_validate_and_open_with_ome_zarr_py(tmp_path, ngff):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = RNG.integers(0, 256, (3, 40, 50), dtype=np.uint8)
    out = tmp_path / "aligned.zarr"
    writer = OmeZarrWriter.create(
        out, data.shape, np.uint8, (40, 4, 4), "nanometer", levels=3, attrs={"params": {}}, ngff=ngff
    )
    for z in range(3):
        writer.write_section(z, data[z])
    writer.mark_complete()
    assert is_complete(out) and writer.ngff == ngff
    validate_ngff(out, ngff)

    image = list(Reader(parse_url(str(out)))())[0]
    assert [level.shape for level in image.data] == [(3, 40, 50), (3, 20, 25), (3, 10, 13)]
    assert all(level.dtype == np.uint8 for level in image.data)
    assert [(a["name"], a["type"], a["unit"]) for a in image.metadata["axes"]] == [
        ("z", "space", "nanometer"),
        ("y", "space", "nanometer"),
        ("x", "space", "nanometer"),
    ]
    np.testing.assert_array_equal(image.data[0].compute(), data)
    block_mean = data[:, :2, :2].reshape(3, -1).mean(axis=1)
    np.testing.assert_array_equal(image.data[1][:, 0, 0].compute(), np.rint(block_mean))
    level2 = [io.downsample2(io.downsample2(section)) for section in data]  # of the rounded level 1
    assert image.data[2][:, 0, -1].compute().tolist() == [section[0, -1] for section in level2]
    assert zarr.open_array(str(out / "0")).chunks == (1, 40, 50)
    level1 = open_stack(out, level=1)
    assert level1.voxel_size == (40.0, 8.0, 8.0) and level1.unit == "nanometer"
    attrs = zarr.open_group(str(out)).attrs
    multiscales = attrs["ome"]["multiscales"][0] if ngff == "0.5" else attrs["multiscales"][0]
    assert (attrs["ome"]["version"] if ngff == "0.5" else multiscales["version"]) == ngff
    translation = multiscales["datasets"][1]["coordinateTransformations"][1]
    assert translation == {"type": "translation", "translation": [0.0, 2.0, 2.0]}
    auto = OmeZarrWriter.create(tmp_path / "auto.zarr", (2, 600, 700), np.uint16)
    assert [a.shape for a in auto.arrays] == [(2, 600, 700), (2, 300, 350), (2, 150, 175)]


def test_writer_rounds_float_sections_into_integer_output(tmp_path):
    writer = OmeZarrWriter.create(tmp_path / "out.zarr", (1, 2, 2), np.uint8, levels=2)
    writer.write_section(0, np.array([[-3.0, 1.4], [2.6, 300.0]]))
    np.testing.assert_array_equal(writer.arrays[0][0], [[0, 1], [3, 255]])
    assert writer.arrays[1][0].tolist() == [[65]]


def test_writer_resume_keeps_done_sections(tmp_path):
    out = tmp_path / "out.zarr"
    data = ramp((4, 10, 12))
    args = (out, data.shape, data.dtype, (40, 4, 4), "nanometer")
    params = {"params": {"model": "tiny", "window": (3, 1)}}
    first = OmeZarrWriter.create(*args, levels=2, attrs=params)
    first.write_section(0, data[0])
    first.write_section(2, data[2])
    one_line_error(out, first.mark_complete, match=r"2 section\(s\) not written \(first: 1\)")
    del first  # the process is killed here

    resumed = OmeZarrWriter.create(*args, levels=2, attrs=params)
    assert resumed.done_sections().tolist() == [True, False, True, False]
    assert not is_complete(out)
    np.testing.assert_array_equal(resumed.arrays[0][2], data[2])
    for z in np.flatnonzero(~resumed.done_sections()):
        resumed.write_section(int(z), data[z])
    resumed.mark_complete()
    assert is_complete(out) and OmeZarrWriter.open(out).done_sections().all()
    np.testing.assert_array_equal(open_stack(out).data.compute(), data)


def test_writer_refuses_different_params_without_overwrite(tmp_path):
    out = tmp_path / "out.zarr"
    writer = OmeZarrWriter.create(out, (2, 8, 8), np.uint8, attrs={"params": {"lr": 1}})
    writer.write_section(0, np.ones((8, 8), np.uint8))
    one_line_error(
        out, OmeZarrWriter.create, out, (2, 8, 8), np.uint8, attrs={"params": {"lr": 2}}, match="different params"
    )
    fresh = OmeZarrWriter.create(out, (2, 8, 8), np.uint8, attrs={"params": {"lr": 2}}, overwrite=True)
    assert not fresh.done_sections().any() and fresh.attrs["params"] == {"lr": 2}

    other = zarr_array(tmp_path / "other.zarr", np.zeros((2, 8, 8), np.uint8))
    one_line_error(other, OmeZarrWriter.create, other, (2, 8, 8), np.uint8, match="not an emalign output")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"x")
    one_line_error(folder, OmeZarrWriter.create, folder, (2, 8, 8), np.uint8, overwrite=True, match="not a Zarr store")
    assert (folder / "keep.jpg").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out.zarr"
    target.write_text("precious")
    one_line_error(target, OmeZarrWriter.create, target, (2, 8, 8), np.uint8, overwrite=True, match="is a file")
    assert target.read_text() == "precious"


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_create_array_is_zstd_in_the_groups_zarr_format(tmp_path, zarr_format):
    group = tmp_path / "fields.zarr"
    args = ("global", (3, 2, 5, 6), (1, 2, 64, 64), np.float32, {"stride": 8})
    array = create_array(group, *args, zarr_format=zarr_format)
    assert array.metadata.zarr_format == zarr_format and array.chunks == (1, 2, 5, 6) and array.attrs["stride"] == 8
    codec = array.metadata.compressor if zarr_format == 2 else array.compressors[0]
    assert str(getattr(codec.cname, "value", codec.cname)) == "zstd"
    assert create_array(group, "more", (2,), (1,), bool).metadata.zarr_format == zarr_format  # follows the group


def test_ngff_05_levels_are_sharded_one_section_deep_capped_to_each_level(tmp_path):
    out = tmp_path / "big.zarr"
    writer = OmeZarrWriter.create(out, (2, 9000, 5000), np.uint8, levels=3)
    assert [a.shards for a in writer.arrays] == [(1, 4096, 4096), (1, 4096, 2560), (1, 2560, 1536)]
    assert all(a.chunks == (1, 512, 512) for a in writer.arrays) and writer.done.shards is None
    assert [a.metadata.dimension_names for a in writer.arrays] == [("z", "y", "x")] * 3
    section = RNG.integers(0, 256, (9000, 5000), dtype=np.uint8)
    writer.write_section(1, section)
    np.testing.assert_array_equal(writer.arrays[0][1], section)
    # one file per shard: an 8192^2 section would be 4 files at level 0; this one is 3 x 2
    assert sorted(p.relative_to(out / "0") for p in (out / "0" / "c" / "1").rglob("*") if p.is_file()) == [
        Path(f"c/1/{y}/{x}") for y in range(3) for x in range(2)
    ]
    assert not (out / "0" / "c" / "0").exists()  # section 0 untouched: its own shards
    small = OmeZarrWriter.create(tmp_path / "small.zarr", (2, 300, 200), np.uint8, shard=0)
    assert small.arrays[0].shards is None and small.arrays[0].chunks == (1, 300, 200)


@pytest.mark.parametrize(
    ("layout", "match"),
    [({"ngff": "0.6"}, "--ngff '0.6'"), ({"shard": 1000}, "--shard 1000"), ({"shard": -512}, "--shard -512")],
)
def test_an_unknown_ngff_version_or_a_shard_off_the_chunk_grid_is_a_one_line_error(tmp_path, layout, match):
    out = tmp_path / "out.zarr"
    one_line_error(out, OmeZarrWriter.create, out, (2, 8, 8), np.uint8, match=match, **layout)
    assert not out.exists()


def test_an_output_of_the_other_ngff_version_is_not_resumed(tmp_path):
    out = tmp_path / "out.zarr"
    OmeZarrWriter.create(out, (2, 8, 8), np.uint8, ngff="0.4", attrs={"params": {}})
    one_line_error(out, OmeZarrWriter.create, out, (2, 8, 8), np.uint8, attrs={"params": {}}, match="NGFF 0.4")


def test_import_roundtrip_uint16(tmp_path):
    data = RNG.integers(0, 65535, (4, 33, 40), dtype=np.uint16)
    src = tmp_path / "stack.tif"
    tifffile.imwrite(src, data, imagej=True, resolution=(0.25, 0.25), metadata={"spacing": 40.0, "unit": "nm"})
    dst = tmp_path / "raw.zarr"
    assert import_stack(src, dst, levels=2, progress=False) == str(dst)
    assert is_complete(dst)
    stack = open_stack(dst)
    assert stack.data.dtype == np.uint16 and stack.voxel_size == pytest.approx((40.0, 4.0, 4.0))
    np.testing.assert_array_equal(stack.data.compute(), data)
    assert open_stack(dst, level=1).shape == (4, 17, 20)
    assert OmeZarrWriter.open(dst).attrs["input"]["shape"] == [4, 33, 40]

    writer = OmeZarrWriter.open(dst)  # simulate a run killed while writing section 1
    writer.arrays[0][1] = 0
    writer.done[1] = False
    import_stack(src, dst, levels=2, progress=False)
    np.testing.assert_array_equal(open_stack(dst).data.compute(), data)

    override = import_stack(src, tmp_path / "um.zarr", progress=False, voxel_size=(0.05, 0.01, 0.01), unit="micrometer")
    assert open_stack(override).voxel_size == (0.05, 0.01, 0.01) and open_stack(override).unit == "micrometer"


def test_import_copies_a_section_tile_by_tile_reading_only_each_tiles_part(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "DASK_XY", 32)
    monkeypatch.setattr(io, "WRITE_TILE", 32)
    data = RNG.integers(0, 255, (2, 100, 70), dtype=np.uint8)
    src = write_layout(tmp_path / "stack.tif", data, "tiles")
    parts = []
    unpatched = io._read_page_region
    monkeypatch.setattr(
        io,
        "_read_page_region",
        lambda *args: parts.append(args[-2:]) or unpatched(*args),  # (rows, cols)
    )
    dst = import_stack(src, tmp_path / "raw.zarr", chunks=(1, 16, 16), progress=False, ngff="0.4")
    np.testing.assert_array_equal(open_stack(dst).data.compute(), data)
    assert max((rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols in parts) == 32 * 32


def test_a_section_written_tile_by_tile_gives_its_whole_pyramid_and_writes_every_shard_once(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "SECTION_CHUNKS", (1, 16, 16))
    section = RNG.integers(0, 255, (150, 97), dtype=np.uint8)  # odd sides: edge tiles and padded levels
    writer = OmeZarrWriter.create(tmp_path / "out.zarr", (2, *section.shape), np.uint8, levels=3, shard=32)
    assert writer.tile_side() == 32 and len(writer.arrays) == 3
    asked, writes = [], []
    write = zarr.Array.__setitem__

    def counted(self, key, value):
        writes.append((self.path, key))
        write(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", counted)

    def tile(origin, shape):
        asked.append(shape)
        return section[origin[0] : origin[0] + shape[0], origin[1] : origin[1] + shape[1]]

    writer.write_tiled(1, tile)
    assert max(max(shape) for shape in asked) == 32  # never more than one shard of pixels at once
    expected = section
    for array in writer.arrays:
        np.testing.assert_array_equal(array[1], expected)
        assert not np.asarray(array[0]).any()
        shards = np.prod([-(-n // s) for n, s in zip(array.shape[1:], array.shards[1:], strict=True)])
        assert sum(path == array.path for path, _ in writes) == shards  # each shard written once, whole
        expected = io.downsample2(expected)
    assert writer.done_sections().tolist() == [False, True]
