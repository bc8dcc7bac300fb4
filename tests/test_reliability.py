"""Reliability: odd and bad input, damaged files, a full or read-only disk, and unfinished outputs.

Property-based tests (hypothesis, few examples, derandomized) drive the public API (``check_array``,
``open_stack``, ``register_sections``, ``pipeline.align``) and the CLI with random shapes, dtypes, chunkings
and contents: each call must either give a correct-looking result or stop with a one-line ``EmalignError`` /
``error: PATH: problem`` (exit 2), never an exception from deep inside or a complete output of nonsense.
Fault tests damage the input or the output location on purpose. Stacks are tiny (at most 8 x 64 x 64).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from helpers import invoke, mounted, ok, one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import emalign
from emalign.errors import EmalignError, IncompleteOutputWarning
from emalign.io import MAX_ABS_VALUE, check_array, check_chunk, import_stack, is_complete, open_stack
from emalign.pipeline import AlignParams, align
from emalign.synth import demo_stack, em_texture

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
INT_DTYPES = [np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.int64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
SHAPE = (8, 64, 64)
RUN = {"scheduler_spec": "sync", "device": "cpu", "progress": False}
CLI = ["--block", "2", "--quiet", "--scheduler", "sync"]
TEXTURE = em_texture((6, 72, 72), seed=5)  # uint8, EM-like: crops of it are realistic sections


def scaled(section: np.ndarray, dtype) -> np.ndarray:
    """uint8 content spread over the natural range of `dtype` (floats: 0..1)."""
    dtype = np.dtype(dtype)
    values = section.astype(np.float64) / 255.0
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    top = min(float(info.max), 2.0**36)  # int64: far below MAX_ABS_VALUE
    return np.rint(values * top).astype(dtype)


def error_line(result, *named: str) -> str:
    """The one-line ``error: ...`` of a refused command: exit 2, one stderr line, no traceback."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for text in named:
        assert str(text) in lines[0], lines[0]
    return lines[0]


def digest(path: Path) -> str:
    """One hash of every file under `path` (or of the file): proof that an input was left untouched."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(path) if Path(path).is_dir() else file.name).encode())
        sha.update(file.read_bytes())
    return sha.hexdigest()


def level0(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["0"][:])


def array(out: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")[name][:])


def same_output(out: Path, reference: Path) -> None:
    assert is_complete(out)
    np.testing.assert_array_equal(level0(out), level0(reference))
    np.testing.assert_array_equal(array(out, "fields/global"), array(reference, "fields/global"))


def write_zarr(path: Path, data: np.ndarray, chunks, zarr_format: int = 2) -> Path:
    out = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, zarr_format=zarr_format)
    out[...] = data
    return path


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    return demo_stack(SHAPE, seed=6)[1].stack


@pytest.fixture(scope="module")
def stack(raw, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "stack.tif"
    tifffile.imwrite(path, raw, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> Path:
    """The uninterrupted `emalign align IN OUT --block 2`."""
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    result = invoke("align", stack, out, *CLI)
    assert result.exit_code == 0, result.output
    return out


# --- in-memory arrays -------------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=40)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=5),
    dtype=st.sampled_from([*INT_DTYPES, *FLOAT_DTYPES, np.bool_, np.complex64]),
    special=st.sampled_from([None, np.nan, np.inf, -np.inf, 1e30, -1e13]),
    seed=st.integers(0, 2**16),
)
def test_check_array_accepts_exactly_the_numeric_finite_3d_stacks(shape, dtype, special, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 100, shape).astype(dtype)
    kind = np.dtype(dtype).kind
    if special is not None and data.size and (kind == "f" or (kind in "iu" and np.isfinite(special))):
        if kind in "iu" and not np.iinfo(dtype).min <= special <= np.iinfo(dtype).max:
            special = None
        else:
            data.flat[int(rng.integers(data.size))] = special
    kept = list(range(len(shape)))
    while len(kept) > 3 and any(shape[a] == 1 for a in kept):
        kept.remove(next(a for a in kept if shape[a] == 1))
    finite = kind != "f" or np.isfinite(data).all()
    small = data.size == 0 or kind not in "iuf" or np.abs(data.astype(np.float64)).max() <= MAX_ABS_VALUE
    valid = kind in "iuf" and len(kept) == 3 and 0 not in shape and finite and small
    if valid:
        result = check_array(data)
        assert result.shape == tuple(shape[a] for a in kept) and result.dtype == data.dtype
        np.testing.assert_array_equal(result.ravel(), data.ravel())
    else:
        message = one_line_error("array", check_array, data)
        assert message.startswith("array: ")


# --- files --------------------------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=20)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 24), st.integers(1, 24)),
    chunks=st.tuples(st.integers(1, 5), st.integers(1, 30), st.integers(1, 30)),
    dtype=st.sampled_from([*INT_DTYPES, np.float32, np.float64]),
    zarr_format=st.sampled_from([2, 3]),
    nan_section=st.one_of(st.none(), st.integers(0, 3)),
)
def test_open_stack_reads_any_zarr_chunking_and_dtype_back_exactly(shape, chunks, dtype, zarr_format, nan_section):
    data = np.stack([scaled(TEXTURE[z % 6, : shape[1], : shape[2]], dtype) for z in range(shape[0])])
    if nan_section is not None and np.dtype(dtype).kind == "f" and nan_section < shape[0]:
        data[nan_section, 0, -1] = np.nan
    else:
        nan_section = None
    with tempfile.TemporaryDirectory() as folder:
        path = write_zarr(Path(folder) / "raw.zarr", data, chunks, zarr_format)
        stack = open_stack(path)
        assert stack.shape == shape and stack.dtype == data.dtype
        for z in range(shape[0]):
            if z == nan_section:
                one_line_error(path, check_chunk, stack, z, match=f"section {z} has 1 NaN")
                assert np.isnan(check_chunk(stack, z, require_finite=False)).sum() == 1
            else:
                np.testing.assert_array_equal(check_chunk(stack, z), data[z])
        np.testing.assert_array_equal(np.asarray(stack.data), data)


@settings(SETTINGS, max_examples=20)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 40)),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64]),
    layout=st.sampled_from(["contiguous", "big-endian", "zlib", "tiled", "folder"]),
)
def test_open_stack_reads_any_tiff_layout_back_exactly(shape, dtype, layout):
    data = np.stack([scaled(TEXTURE[z % 6, : shape[1], : shape[2]], dtype) for z in range(shape[0])])
    options = {"big-endian": {"byteorder": ">"}, "zlib": {"compression": "zlib"}, "tiled": {"tile": (16, 16)}}
    with tempfile.TemporaryDirectory() as folder:
        if layout == "folder":
            path = Path(folder)
            for z, section in enumerate(data):
                tifffile.imwrite(path / f"section{z}.tif", section)
        else:
            path = Path(folder) / "stack.tif"
            tifffile.imwrite(path, data, photometric="minisblack", **options.get(layout, {}))
        stack = open_stack(path)
        assert stack.shape == shape and stack.dtype == data.dtype
        for z in range(shape[0]):
            np.testing.assert_array_equal(check_chunk(stack, z), data[z])


# --- register_sections ------------------------------------------------------------------------------------


@pytest.mark.e2e
@SETTINGS
@given(
    depth=st.integers(1, 4),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    dtype=st.sampled_from([*INT_DTYPES, *FLOAT_DTYPES]),
    content=st.sampled_from(["texture", "constant", "zeros", "nan", "huge"]),
    method=st.sampled_from(["stitched", "sequential"]),
)
def test_register_sections_gives_a_result_of_the_input_shape_or_a_one_line_error(
    depth, height, width, dtype, content, method
):
    stack = np.stack([scaled(TEXTURE[z, :height, :width], dtype) for z in range(depth)])
    if content == "constant":
        stack[depth // 2] = stack[depth // 2].flat[0]
    elif content == "zeros":
        stack[depth // 2] = 0
    elif content == "nan" and np.dtype(dtype).kind == "f":
        stack[depth // 2, 0, 0] = np.nan
    elif content == "huge" and np.dtype(dtype).itemsize >= 4:
        stack[depth // 2, 0, 0] = np.iinfo(dtype).max if np.dtype(dtype).kind in "iu" else 1e30
        content = "huge" if float(stack[depth // 2, 0, 0]) > MAX_ABS_VALUE else "texture"
    else:
        content = "texture" if content in ("nan", "huge") else content
    problem = {"nan": "NaN", "huge": "values up to"}.get(content) or ("too small" if min(height, width) < 4 else None)
    if problem:
        one_line_error("stack", emalign.register_sections, stack, method=method, device="cpu", match=problem)
        return
    result = emalign.register_sections(stack, method=method, device="cpu")
    assert result.aligned.shape == stack.shape and result.aligned.dtype == stack.dtype
    assert result.fields.shape == (depth, 2, height, width) and result.fields.dtype == np.float32
    assert np.isfinite(result.fields).all()
    if content in ("constant", "zeros") and method == "stitched":
        z = depth // 2  # a section with no content is not moved
        np.testing.assert_array_equal(result.aligned[z], stack[z])


@pytest.mark.e2e
@SETTINGS
@given(
    dtype=st.sampled_from([*INT_DTYPES, *FLOAT_DTYPES]),
    offset=st.floats(0, 0.3),
    method=st.sampled_from(["stitched", "sequential"]),
)
def test_register_sections_leaves_identical_sections_in_place_whatever_the_dtype(dtype, offset, method):
    section = scaled(TEXTURE[0, :40, :48] * (1 - offset) + 255 * offset, dtype)
    result = emalign.register_sections(np.stack([section] * 4), method=method, device="cpu")
    rms = float(np.sqrt((result.fields**2).sum(1).mean()))
    # measured: 0.05 px stitched, 0.38 px sequential (the paper's inference re-estimates from its outputs)
    assert rms < (0.2 if method == "stitched" else 0.8)


# --- the pipeline ------------------------------------------------------------------------------------------


@pytest.mark.e2e
@settings(SETTINGS, max_examples=8)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 48), st.integers(1, 48)),
    chunks=st.tuples(st.integers(1, 3), st.integers(4, 64), st.integers(4, 64)),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64]),
    block=st.integers(1, 4),
    special=st.sampled_from([None, "zeros", "constant", "nan", "huge"]),
)
def test_align_completes_a_sane_output_or_refuses_with_a_one_line_error(shape, chunks, dtype, block, special):
    depth, height, width = shape
    data = np.stack([scaled(TEXTURE[z, :height, :width], dtype) for z in range(depth)])
    bad = depth // 2
    kind = np.dtype(dtype).kind
    if special == "zeros":
        data[bad] = 0
    elif special == "constant":
        data[bad] = data[bad].flat[0] or 1
    elif special == "nan" and kind == "f":
        data[bad, -1, -1] = np.nan
    elif special == "huge" and np.dtype(dtype).itemsize >= 4:
        data[bad, 0, 0] = np.iinfo(dtype).max if kind in "iu" else 1e20
    special = {"nan": "nan" if kind == "f" else None}.get(special, special)
    if special == "huge" and np.abs(data.astype(np.float64)).max() <= MAX_ABS_VALUE:
        special = None
    with tempfile.TemporaryDirectory() as folder:
        path = write_zarr(Path(folder) / "raw.zarr", data, chunks)
        out = Path(folder) / "out.zarr"
        problem = "too small" if min(height, width) < 4 else {"nan": "NaN", "huge": "values up to"}.get(special)
        if problem:
            one_line_error(path, align, path, out, AlignParams(block=block), match=problem, **RUN)
            assert not is_complete(out)
            return
        ws, _, report = align(path, out, AlignParams(block=block), **RUN)
        assert is_complete(out)
        assert level0(out).shape == shape and level0(out).dtype == data.dtype
        assert np.isfinite(array(out, "fields/global")).all()
        assert f"sections: {depth}" in report
        with open(out / "qc.csv", newline="") as handle:
            assert [int(row["z"]) for row in csv.DictReader(handle)] == list(range(depth))
        if special in ("zeros", "constant"):  # a section with no content: flagged, written through unchanged
            assert ws.flags()[bad] & 1, ws.flags()
            np.testing.assert_array_equal(level0(out)[bad], data[bad])


def _fields_of(data: np.ndarray, folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    path = write_zarr(folder / f"{name}.zarr", data, (1, *data.shape[1:]))
    ws, _, _ = align(path, folder / f"{name}-out.zarr", AlignParams(block=3), **RUN)
    return array(folder / f"{name}-out.zarr", "fields/global"), ws.flags()


@pytest.fixture(scope="module")
def uint8_fields(tmp_path_factory):
    """Fields and flags of a 5 x 48 x 48 uint8 stack, the baseline of the dtype tests."""
    data = demo_stack((5, 48, 48), seed=1)[1].stack
    return data, *_fields_of(data, tmp_path_factory.mktemp("uint8"), "uint8")


@pytest.mark.e2e
@settings(SETTINGS, max_examples=4)
@given(dtype=st.sampled_from([np.uint16, np.uint32, np.int16, np.int32, np.float32, np.float64]))
def test_align_gives_the_same_fields_for_the_same_content_in_any_dtype(dtype, uint8_fields):
    data, fields, flags = uint8_fields
    with tempfile.TemporaryDirectory() as folder:
        other, other_flags = _fields_of(scaled(data, dtype), Path(folder), "other")
    np.testing.assert_array_equal(other_flags, flags)
    np.testing.assert_allclose(other, fields, rtol=0, atol=0.05)  # measured: identical


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", [np.uint16, np.int64])
def test_align_aligns_content_that_does_not_span_its_integer_dtype(uint8_fields, tmp_path, dtype):
    data, fields, flags = uint8_fields
    other, other_flags = _fields_of(data.astype(dtype), tmp_path, "narrow")
    np.testing.assert_array_equal(other_flags, flags)
    np.testing.assert_allclose(other, fields, rtol=0, atol=0.05)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"spring": float("nan")}, "spring nan"),
        ({"spring": float("inf")}, "spring inf"),
        ({"spring": -1.0}, "spring -1.0"),
        ({"trend_stiffness": float("nan")}, "trend_stiffness nan"),
        ({"smoothing": float("nan")}, "smoothing nan"),
        ({"coarse_downsample": 0}, "coarse_downsample 0"),
        ({"coarse_downsample": 40}, "too small"),
    ],
)
def test_parameters_that_would_crash_or_blank_the_output_are_refused_before_any_work(stack, tmp_path, values, problem):
    """Measured before the check: NaN/inf spring or NaN trend stiffness gave an all-zero output marked complete;
    coarse_downsample 0 crashed inside the rigid stage (slice step 0)."""
    out = tmp_path / "out.zarr"
    one_line_error(
        "bad plan" if "too small" not in problem else stack,
        align,
        stack,
        out,
        AlignParams(block=2, **values),
        match=problem,
        **RUN,
    )
    assert not out.exists()


# --- the CLI -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tiff(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.tif"
    tifffile.imwrite(path, demo_stack((4, 32, 32), seed=2)[1].stack, photometric="minisblack")
    return path


@pytest.mark.e2e
@settings(SETTINGS, max_examples=20)
@given(
    command=st.sampled_from(["prealign", "estimate", "stitch", "refine", "polish", "render", "qc"]),
    z_range=st.one_of(st.none(), st.text("0123456789:-a ", max_size=6)),
    skip=st.text("0123456789,- x", max_size=6),
    numbers=st.fixed_dictionaries(
        {
            "--block": st.integers(-1, 5),
            "--stride": st.integers(-1, 40),
            "--coarse-downsample": st.integers(-1, 3),
            "--spring": st.sampled_from(["0.2", "0", "-1", "nan", "inf", "x"]),
            "--level": st.integers(-1, 1),
        }
    ),
)
def test_any_stage_options_give_a_result_or_a_one_line_error(small_tiff, command, z_range, skip, numbers):
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.zarr"
        args = [command, small_tiff, out, "--quiet", "--scheduler", "sync", "--skip", skip]
        args += [item for pair in numbers.items() for item in pair]
        if z_range is not None:
            args += ["--z-range", z_range]
        result = invoke(*args)
        if result.exit_code == 0:
            assert command in ("prealign", "qc"), result.output
            expected = "prealign: " if command == "prealign" else "incomplete output: 0 of 4 sections rendered"
            assert result.output.startswith(expected), result.output
        elif "Usage:" in result.stderr:  # click's own refusal of a malformed number
            assert result.exit_code == 2 and "Traceback" not in result.output
        else:
            error_line(result)
        assert not is_complete(out)


# --- damaged input ----------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_corrupt_input_chunk_is_named_and_after_repair_the_run_resumes(raw, reference, tmp_path, zarr_format):
    path = write_zarr(tmp_path / "raw.zarr", raw, (1, 32, 32), zarr_format)
    key = "6.1.0" if zarr_format == 2 else "c/6/1/0"  # section 6: not one the pixel-size estimate reads
    (path / key).write_bytes(b"\x00garbage" * 16)
    out = tmp_path / "out.zarr"
    error_line(invoke("align", path, out, *CLI), path, "section 6 could not be read", f"chunk {key}:")
    assert not is_complete(out)
    stack = open_stack(path)  # the other chunks, and the other sections, read as before
    for z in (5, 7):
        np.testing.assert_array_equal(check_chunk(stack, z), raw[z])
    done = array(out, "stages/prealign")
    assert not done[3]  # the block that reads section 6 (sections 6-7, with their 3 neighbours)
    kept = [out / "coarse" / "pairs" / str(index) / "0" / "0" for index in np.flatnonzero(done)]

    zarr.open_array(str(path), mode="r+")[6] = raw[6]  # repaired
    stamps = [file.stat().st_mtime_ns for file in kept]
    assert invoke("align", path, out, *CLI).exit_code == 0
    assert [file.stat().st_mtime_ns for file in kept] == stamps  # blocks finished before the error: not redone
    same_output(out, reference)


@pytest.mark.e2e
def test_a_corrupt_chunk_in_a_section_the_pixel_size_estimate_reads_is_named_before_the_output_exists(
    raw, reference, tmp_path
):
    path = write_zarr(tmp_path / "raw.zarr", raw, (1, 32, 32))
    (path / "5.1.0").write_bytes(b"\x00garbage" * 16)
    out = tmp_path / "out.zarr"
    error_line(invoke("align", path, out, *CLI), path, "section 5 could not be read", "chunk 5.1.0:")
    assert not out.exists()  # no output whose pixel size a repaired section would change
    zarr.open_array(str(path), mode="r+")[5] = raw[5]
    assert invoke("align", path, out, *CLI).exit_code == 0
    same_output(out, reference)


@pytest.mark.e2e
def test_a_chunk_damaged_after_prealign_is_named_by_render_and_qc(raw, reference, tmp_path):
    path = write_zarr(tmp_path / "raw.zarr", raw, (1, 64, 64))
    out = tmp_path / "out.zarr"
    for stage in ("prealign", "estimate", "stitch", "refine", "polish"):
        assert invoke(stage, path, out, *CLI).exit_code == 0
    good = (path / "6.0.0").read_bytes()
    (path / "6.0.0").write_bytes(b"garbage")
    error_line(invoke("render", path, out, *CLI), path, "section 6 could not be read (chunk 6.0.0:")
    done = array(out, "done")
    assert not done[6] and not is_complete(out)
    (path / "6.0.0").write_bytes(good)
    assert invoke("render", path, out, *CLI).exit_code == 0
    (path / "6.0.0").write_bytes(b"garbage")
    error_line(invoke("qc", path, out, *CLI), path, "section 6 could not be read (chunk 6.0.0:")
    same_output(out, reference)


@pytest.mark.e2e
def test_a_missing_input_chunk_reads_as_a_blank_section_that_is_flagged_and_bridged(raw, tmp_path):
    path = write_zarr(tmp_path / "raw.zarr", raw, (1, 64, 64))
    (path / "3.0.0").unlink()
    out = tmp_path / "out.zarr"
    result = invoke("align", path, out, *CLI)
    assert result.exit_code == 0 and "flagged: 1 [3 (blank)]" in result.output
    assert not level0(out)[3].any()
    with open(out / "qc.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["flags"] for row in rows] == [""] * 3 + ["blank"] + [""] * 4
    assert float(rows[5]["corr_after"]) > float(rows[5]["corr_before"])  # the section after the gap: aligned


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("layout", "fraction", "problem"),
    [
        ("contiguous", 0.6, "section 4 could not be read (OSError: file ends inside section 4)"),
        ("zlib", 0.6, "is truncated or damaged (tifffile: shaped series failed to reshape"),
        ("tiled", 0.95, "section 7 could not be read (TiffFileError: corrupted tile"),
        ("tiled", 0.3, "is truncated or damaged"),
    ],
)
def test_a_truncated_tiff_is_a_one_line_error_and_nothing_is_written(raw, tmp_path, layout, fraction, problem):
    options = {"zlib": {"compression": "zlib"}, "tiled": {"tile": (16, 16)}}.get(layout, {})
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, raw, photometric="minisblack", **options)
    with open(path, "r+b") as handle:
        handle.truncate(int(path.stat().st_size * fraction))
    out = tmp_path / "out.zarr"
    error_line(invoke("align", path, out, *CLI), path, problem)  # one line: tifffile's own warnings kept off stderr
    assert not is_complete(out)


def test_a_folder_of_sections_of_several_sizes_is_aligned_on_a_common_canvas_and_align_says_so(raw, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, section in enumerate(raw):
        tifffile.imwrite(folder / f"s{z}.tif", section[: 56 if z % 3 == 1 else 64, 2:])
    out = tmp_path / "out.zarr"
    result = ok("align", folder, out, "--block", "2", "--scheduler", "sync")
    assert f"{folder}: sections of 2 sizes centred on a 64 x 62 canvas (margins: no data)" in result.output
    assert level0(out).shape == (8, 64, 62) and is_complete(out)


def test_a_truncated_or_empty_file_in_a_tiff_folder_is_named(raw, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for z, section in enumerate(raw):
        tifffile.imwrite(folder / f"s{z}.tif", section)
    damaged = folder / "s3.tif"
    damaged.write_bytes(damaged.read_bytes()[:-2000])
    error_line(invoke("align", folder, tmp_path / "a.zarr", *CLI), folder, "section 3 could not be read (s3.tif:")
    damaged.write_bytes(b"")
    error_line(invoke("align", folder, tmp_path / "b.zarr", *CLI), damaged, "not a readable TIFF")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"chunks": [0, 64, 64]}, "invalid chunk shape"),
        ({"compressor": {"id": "no-such-codec"}}, "not a readable Zarr store"),
        ({"shape": [-8, 64, 64]}, "not a readable Zarr store"),
        ({"dtype": "|O"}, "not a readable Zarr store"),
    ],
)
def test_damaged_zarr_metadata_is_a_one_line_error(raw, tmp_path, change, problem):
    import json

    path = write_zarr(tmp_path / "raw.zarr", raw, (1, 64, 64))
    meta = json.loads((path / ".zarray").read_text())
    (path / ".zarray").write_text(json.dumps({**meta, **change}))
    error_line(invoke("align", path, tmp_path / "out.zarr", *CLI), path, problem)


# --- a full or read-only disk --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_full_disk_stops_with_one_line_and_a_resumable_partial_output(stack, reference, tmp_path):
    before = digest(stack)
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=96k", "tmpfs") as disk:
        out = disk / "out.zarr"
        line = error_line(invoke("align", stack, out, *CLI), out, "No space left on device")
        assert "run the same command to resume" in line or "cannot write the output here" in line
        assert not is_complete(out)
        if out.exists():  # recognisably partial: an emalign output whose complete flag is false
            assert zarr.open_group(str(out), mode="r").attrs["emalign"]["complete"] is False
            assert not list(out.rglob("*.partial"))  # the refused write left no temporary file
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        assert invoke("align", stack, out, *CLI).exit_code == 0
        same_output(out, reference)
    assert digest(stack) == before


@pytest.mark.e2e
@pytest.mark.parametrize("after_writes", [3, 45, 90, 115])
def test_a_refused_write_anywhere_in_the_run_is_one_line_and_resumable(
    stack, reference, tmp_path, monkeypatch, after_writes
):
    """No root needed: zarr's file writes start failing with ENOSPC after `after_writes` writes."""
    import zarr.storage._local as local

    original, count = local._put, {"n": 0}

    def full(path, value, exclusive=False):
        count["n"] += 1
        if count["n"] > after_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(path, value, exclusive)

    before = digest(stack)
    out = tmp_path / "out.zarr"
    monkeypatch.setattr(local, "_put", full)
    error_line(invoke("align", stack, out, *CLI), out, "No space left on device")
    assert not is_complete(out)
    monkeypatch.setattr(local, "_put", original)
    assert invoke("align", stack, out, *CLI).exit_code == 0
    same_output(out, reference)
    assert digest(stack) == before


@pytest.mark.e2e
def test_a_read_only_location_is_refused_before_any_work(stack, reference, tmp_path):
    with mounted(tmp_path / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs") as folder:
        error_line(invoke("align", stack, folder / "out.zarr", *CLI), "Read-only file system", "cannot write")
    partial = tmp_path / "partial.zarr"
    assert invoke("prealign", stack, partial, *CLI).exit_code == 0
    with mounted(tmp_path / "view", "--bind", str(partial)) as view:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        for command in ("align", "estimate"):
            error_line(invoke(command, stack, view, *CLI), view, "cannot write the output here (Read-only file system)")
    assert not is_complete(partial)


def test_a_new_output_that_cannot_be_written_is_removed_again_in_the_python_api(stack, tmp_path, monkeypatch):
    """The disk fills while the output's arrays are being created: EmalignError, and no half-made folder."""
    import emalign.io as io

    original, calls = io.create_array, {"n": 0}

    def second_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(io, "create_array", second_fails)
    out = tmp_path / "out.zarr"
    message = one_line_error(out, align, stack, out, AlignParams(block=2), match="cannot write the output here", **RUN)
    assert "No space left on device" in message and calls["n"] == 2
    assert not out.exists()


# --- unfinished outputs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unfinished(stack, tmp_path_factory) -> Path:
    """An output rendered for sections 0..3 of 8."""
    out = tmp_path_factory.mktemp("unfinished") / "out.zarr"
    for stage in ("prealign", "estimate", "stitch", "refine", "polish"):
        assert invoke(stage, stack, out, *CLI).exit_code == 0
    assert invoke("render", stack, out, *CLI, "--z-range", "0:4").exit_code == 0
    return out


@pytest.mark.e2e
def test_qc_of_an_unfinished_output_says_so(unfinished, stack, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(unfinished, out)
    result = invoke("qc", stack, out, *CLI)
    assert result.exit_code == 0
    assert result.output.startswith("incomplete output: 4 of 8 sections rendered")
    with open(out / "qc.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and all(row["corr_after"] == "nan" for row in rows[5:])
    assert not is_complete(out)


@pytest.mark.e2e
def test_open_stack_warns_about_an_unfinished_output_and_not_a_finished_one(unfinished, reference):
    with pytest.warns(IncompleteOutputWarning, match=r"4 of 8 sections written"):
        data = open_stack(unfinished).data
    assert not np.asarray(data[4:]).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_stack(reference)


def test_open_stack_warns_about_an_unfinished_import(raw, tmp_path):
    src = write_zarr(tmp_path / "src.zarr", raw, (1, 64, 64))
    dst = tmp_path / "imported.zarr"
    import_stack(src, dst, progress=False)
    zarr.open_array(str(dst / "done"), mode="r+")[2] = False
    group = zarr.open_group(str(dst), mode="r+")
    group.attrs["emalign"] = {**group.attrs["emalign"], "complete": False}
    with pytest.warns(IncompleteOutputWarning, match="7 of 8 sections written"):
        open_stack(dst)


@pytest.mark.e2e
def test_the_napari_reader_warns_once_about_an_unfinished_output(unfinished):
    from emalign.napari.reader import read_output  # builds plain layer tuples: napari itself is not needed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = read_output(unfinished)
    messages = [str(w.message) for w in caught if "incomplete" in str(w.message) or "unfinished" in str(w.message)]
    assert len(messages) == 1 and "4 of 8 sections written" in messages[0]
    aligned = next(layer for layer in layers if layer[1]["name"] == "aligned")
    assert aligned[1]["metadata"]["complete"] is False


@pytest.mark.e2e
def test_register_sections_refuses_sections_under_4_px_and_takes_4_px():
    assert issubclass(EmalignError, ValueError)
    tiny = scaled(TEXTURE[:2, :4, :9], np.uint8)
    message = one_line_error("stack", emalign.register_sections, tiny[:, :3], match="too small")
    assert "3 x 9 px" in message and "need at least 4 px" in message
    assert emalign.register_sections(tiny, device="cpu").aligned.shape == (2, 4, 9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
