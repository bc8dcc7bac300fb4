"""The ``emalign`` command: click's CliRunner on ``emalign.cli.main``, plus the installed entry point.

Stacks are tiny (12 x 96 x 96, ``--block 4``: three blocks per stage). Bad input must end with one line
``error: ...`` on stderr, exit status 2, and no complete output.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from helpers import entry_point, invoke, kill_when, ok, write_stack

from emalign.io import is_complete, open_stack
from emalign.pipeline import AlignParams
from emalign.synth import DEMO_VOXEL_NM, demo_stack

SHAPE = (12, 96, 96)
BLOCK = ["--block", "4", "--polish", "on", "--polish-patch", "32", "--quiet"]  # polish: the stage always runs
SYNC = [*BLOCK, "--scheduler", "sync"]  # one block at a time: a predictable order of the work
COMMANDS = (
    "align",
    "import",
    "prealign",
    "adapt",
    "estimate",
    "stitch",
    "refine",
    "polish",
    "render",
    "qc",
    "demo",
    "train",
    "view",
    "volume",
)


def error_line(result) -> str:
    """The one-line `error: ...` of a refused command (exit status 2, no traceback); returns it."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def level0(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["0"][:])


def global_fields(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["fields/global"][:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_stack(tmp_path_factory.mktemp("input"), SHAPE, seed=2)


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory):
    """`emalign align IN OUT --block 4` (default scheduler), uninterrupted; returns (OUT, the result)."""
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    return out, ok("align", stack, out, *BLOCK)


# --- help and align ---------------------------------------------------------------------------------------


def test_help_lists_every_command():
    result = ok("--help")
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)
    for command in COMMANDS:
        assert ok(command, "--help").output.startswith("Usage:")


@pytest.mark.e2e
def test_align_writes_a_complete_output_and_reports_qc_and_timing(stack, reference):
    out, result = reference
    assert is_complete(out)
    assert level0(out).shape == SHAPE and level0(out).dtype == np.uint8
    assert "sections: 12; flagged: 0" in result.output
    assert "median correlation with the previous section" in result.output
    assert "time: " in result.output and "MPx/s" in result.output
    assert f"aligned OME-Zarr: {out}" in result.output
    with open(out / "qc.csv", newline="") as handle:
        assert [int(row["z"]) for row in csv.DictReader(handle)] == list(range(SHAPE[0]))
    assert (out / "qc.png").exists()
    meta = zarr.open_group(str(out), mode="r").attrs["emalign"]
    assert meta["params"] == AlignParams(block=4, polish="on", polish_patch=32).to_dict()
    assert meta["input"]["path"] == str(stack.resolve())


@pytest.mark.e2e
def test_align_with_ngff_04_writes_the_zarr_v2_layout_with_the_same_result(stack, reference, tmp_path):
    from ome_zarr_models.v04 import Image

    ref, _ = reference
    out = tmp_path / "v2.zarr"
    ok("align", stack, out, *BLOCK, "--ngff", "0.4")
    assert (out / ".zattrs").exists() and not (out / "zarr.json").exists()
    group = zarr.open_group(str(out), mode="r")
    assert group.metadata.zarr_format == 2 and group.attrs["multiscales"][0]["version"] == "0.4"
    Image.from_zarr(group)  # a valid NGFF 0.4 image
    assert is_complete(out) and open_stack(out).shape == SHAPE
    np.testing.assert_array_equal(level0(out), level0(ref))
    np.testing.assert_array_equal(global_fields(out), global_fields(ref))
    assert (out / "qc.csv").read_text() == (ref / "qc.csv").read_text()
    assert "output complete" in ok("render", stack, out, *BLOCK, "--ngff", "0.4").output  # resumes: all done


@pytest.mark.e2e
def test_a_stage_run_into_a_log_prints_per_block_progress_lines_with_an_eta(stack, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "rerender.zarr"
    shutil.copytree(ref, out)
    zarr.open_array(str(out / "done"), mode="r+")[:] = False  # render all 3 blocks again
    output = ok("render", stack, out, *[arg for arg in BLOCK if arg != "--quiet"]).output
    lines = [line for line in output.splitlines() if line.startswith("render: ") and " blocks, " in line]
    assert "\r" not in output and lines[0].startswith("render: 0/3 blocks, 0 %") and "ETA unknown" in lines[0]
    assert lines[-1].startswith("render: 3/3 blocks, 100 %, ") and lines[-1].endswith(" s elapsed")
    assert any(re.search(r"render: [12]/3 blocks, \d+ %, \d+ s elapsed, ETA \d+ s$", line) for line in lines)
    np.testing.assert_array_equal(level0(out), level0(ref))


# --- stage commands ---------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_stage_commands_in_order_give_the_same_output_as_align(stack, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "staged.zarr"
    assert "prealign: 2 block(s) done" in ok("prealign", stack, out, *BLOCK, "--z-range", "0:6").output
    assert not is_complete(out)
    message = ok("prealign", stack, out, *BLOCK, "--z-range", "6:").output
    assert "prealign: 1 block(s) done; global rigid solve done; 0 flagged" in message
    assert "estimate: 1 block(s) done" in ok("estimate", stack, out, *BLOCK, "--z-range", "0:4").output
    assert "estimate: 2 block(s) done" in ok("estimate", stack, out, *BLOCK, "--z-range", "4:12").output
    assert "stitch: stitched fields written" in ok("stitch", stack, out, *BLOCK).output
    assert "refine: 2 block(s) done\n" in ok("refine", stack, out, *BLOCK, "--z-range", "0:8").output
    assert "translation solve done" in ok("refine", stack, out, *BLOCK, "--z-range", "8:").output
    assert "polish: 1 block(s) done\n" in ok("polish", stack, out, *BLOCK, "--z-range", "0:4").output
    assert "node solve done" in ok("polish", stack, out, *BLOCK, "--z-range", "4:").output
    assert "render: 2 block(s) done" in ok("render", stack, out, *BLOCK, "--z-range", ":6").output
    assert not is_complete(out)
    assert "output complete" in ok("render", stack, out, *BLOCK, "--z-range", "6:12").output
    assert is_complete(out)
    assert "sections: 12" in ok("qc", stack, out, *BLOCK).output
    np.testing.assert_array_equal(level0(out), level0(ref))
    np.testing.assert_array_equal(global_fields(out), global_fields(ref))
    assert (out / "qc.csv").read_text() == (ref / "qc.csv").read_text()


def test_estimate_before_prealign_is_a_clear_error(stack, tmp_path):
    out = tmp_path / "early.zarr"
    line = error_line(invoke("estimate", stack, out, *BLOCK))
    assert str(out) in line and "run `emalign prealign` first" in line
    assert not is_complete(out)


@pytest.mark.e2e
def test_a_stage_with_other_params_than_the_output_is_refused(stack, reference):
    out, _ = reference
    line = error_line(invoke("estimate", stack, out, "--block", "8", "--quiet"))
    assert str(out) in line and "different params" in line
    assert is_complete(out)


# --- parameters -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_align_into_an_output_with_other_params_needs_overwrite_and_records_every_param(stack, reference, tmp_path):
    ref, _ = reference
    before = dict(zarr.open_group(str(ref), mode="r").attrs["emalign"])
    line = error_line(invoke("align", stack, ref, "--block", "4", "--stride", "16", "--quiet"))
    assert str(ref) in line and "different params" in line and "overwrite" in line
    assert dict(zarr.open_group(str(ref), mode="r").attrs["emalign"]) == before

    out = tmp_path / "copy.zarr"
    shutil.copytree(ref, out)
    options = {
        "--model": "faemreg-small",
        "--stride": "16",
        "--block": "4",
        "--stitch-block": "8",
        "--stitch-overlap": "2",
        "--spring": "0.1",
        "--tile": "64",
        "--halo": "8",
        "--task-tile": "64",
        "--coarse-downsample": "2",
        "--trend-stiffness": "1000000",
        "--max-rotation": "5",
        "--skip": "3,7",
        "--level": "0",
        "--polish": "off",
        "--polish-patch": "64",
        "--memory-per-task": "3",
    }
    args = [item for pair in options.items() for item in pair]
    error_line(invoke("align", stack, out, *args, "--quiet"))
    ok("align", stack, out, *args, "--quiet", "--overwrite")
    assert is_complete(out)
    recorded = zarr.open_group(str(out), mode="r").attrs["emalign"]["params"]
    expected = {
        "model": "faemreg-small",
        "stride": 16,
        "block": 4,
        "stitch_block": 8,
        "stitch_overlap": 2,
        "spring": 0.1,
        "tile": 64,
        "halo": 8,
        "coarse_downsample": 2,
        "trend_stiffness": 1e6,
        "max_rotation_deg": 5.0,
        "skip": [3, 7],
        "level": 0,
        "polish": "off",
        "polish_patch": 64,
        "task_tile": 64,
        "memory_per_task": 3.0,
    }
    # every AlignParams field is recorded: those given above with their values, any other with its default
    assert recorded == {**AlignParams().to_dict(), **expected}
    with open(out / "qc.csv", newline="") as handle:
        flags = {int(row["z"]): row["flags"] for row in csv.DictReader(handle) if row["flags"]}
    assert flags == {3: "skipped", 7: "skipped"}


# --- bad input --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    raw = demo_stack(SHAPE, seed=3)[1].stack
    (folder / "notes.txt").write_text("not a stack\n")
    tifffile.imwrite(folder / "flat.tif", raw[0], photometric="minisblack")
    tifffile.imwrite(folder / "channels.tif", np.stack([raw] * 3, axis=1), photometric="minisblack")
    mask = zarr.open_array(str(folder / "mask.zarr"), mode="w", shape=SHAPE, chunks=(1, 96, 96), dtype=bool)
    mask[...] = raw > 100
    (folder / "taken.out").write_text("a file\n")
    return folder


def corrupt_zarr(folder: Path, z: int) -> Path:
    """A zarr v2 uint8 stack, one chunk per section, section z's chunk overwritten with garbage."""
    path = folder / f"corrupt{z}.zarr"
    array = zarr.open_array(str(path), mode="w", shape=SHAPE, chunks=(1, *SHAPE[1:]), dtype=np.uint8, zarr_format=2)
    array[...] = demo_stack(SHAPE, seed=3)[1].stack
    chunk = path / f"{z}.0.0"
    assert chunk.exists()
    chunk.write_bytes(b"\x00garbage" * 16)
    return path


BAD_INPUT = {
    "missing path": ("missing.tif", "does not exist"),
    "text file": ("notes.txt", "not a recognised stack"),
    "2D TIFF": ("flat.tif", "is 2D"),
    "4D multichannel TIFF": ("channels.tif", "more than one channel"),
    "bool Zarr": ("mask.zarr", "dtype bool"),
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad_inputs, name):
    filename, problem = BAD_INPUT[name]
    out = bad_inputs / f"out-{filename}.zarr"
    line = error_line(invoke("align", bad_inputs / filename, out, *BLOCK))
    assert str(bad_inputs / filename) in line and problem in line
    assert not out.exists()
    line = error_line(invoke("prealign", bad_inputs / filename, out, *BLOCK))
    assert str(bad_inputs / filename) in line
    assert not out.exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("z", "command"),
    [
        (0, ["align"]),
        (3, ["prealign", "--z-range", "4:12"]),
    ],
)
def test_a_corrupt_chunk_is_a_one_line_error_naming_the_section(bad_inputs, z, command):
    path = corrupt_zarr(bad_inputs, z)
    out = bad_inputs / f"out-corrupt{z}.zarr"
    line = error_line(invoke(command[0], path, out, *SYNC, *command[1:]))
    assert str(path) in line and f"section {z} could not be read" in line
    assert not is_complete(out)


def test_an_output_that_is_a_file_is_refused(stack, bad_inputs):
    target = bad_inputs / "taken.out"
    line = error_line(invoke("align", stack, target, *BLOCK))
    assert str(target) in line and "is a file" in line
    assert target.read_text() == "a file\n"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["prealign", "--z-range", "5:2"], "--z-range '5:2'"),
        (["estimate", "--z-range", "a:b"], "--z-range 'a:b'"),
        (["align", "--scheduler", "bogus"], "--scheduler 'bogus'"),
        (["align", "--model", "no-such-model"], "'no-such-model'"),
        (["align", "--skip", "one,two"], "--skip 'one,two'"),
        (["align", "--tile", "16"], "bad plan"),
        (["align", "--polish-patch", "8"], "--polish-patch 8"),
        (["align", "--trend-stiffness", "0"], "trend_stiffness 0.0 (need a finite number > 0)"),
        (["render", "--shard", "1000"], "--shard 1000: expected 0 (no shards) or a multiple of the (512, 512) px"),
    ],
)
def test_bad_options_are_one_line_errors_and_leave_no_complete_output(stack, tmp_path, args, named):
    out = tmp_path / "out.zarr"
    line = error_line(invoke(args[0], stack, out, *BLOCK, *args[1:]))
    assert named in line
    assert not is_complete(out)


# --- import and demo --------------------------------------------------------------------------------------


def test_import_of_a_tiff_gives_an_ome_zarr_of_the_same_data(stack, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    out = tmp_path / "imported.zarr"
    assert f"wrote {out}" in ok("import", stack, out, "--chunk", "64", "--voxel-size", "40,4,4").output
    assert is_complete(out)
    imported = open_stack(out)
    np.testing.assert_array_equal(np.asarray(imported.data), tifffile.imread(stack))
    assert imported.voxel_size == (40.0, 4.0, 4.0)
    node = next(iter(Reader(parse_url(str(out)))()))
    np.testing.assert_array_equal(np.asarray(node.data[0]), tifffile.imread(stack))
    assert zarr.open_group(str(out), mode="r")["0"].chunks == (1, 64, 64)
    error_line(invoke("import", stack, tmp_path / "other.zarr", "--voxel-size", "40,4"))
    error_line(invoke("import", tmp_path / "missing.tif", tmp_path / "other.zarr"))


def test_import_writes_an_ngff_unit_name(stack, tmp_path):
    out = tmp_path / "unit.zarr"
    ok("import", stack, out, "--voxel-size", "40,4,4", "--unit", "nm")
    axes = zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["axes"]
    assert [axis["unit"] for axis in axes] == ["nanometer"] * 3


@pytest.mark.e2e
def test_demo_prints_the_accuracy_table_and_writes_an_aligned_ome_zarr(tmp_path):
    out = tmp_path / "demo"
    result = ok("demo", out, "--sections", "12", "--size", "128", "--device", "cpu")
    rows = {line.split("|")[1].strip(): line for line in result.output.splitlines() if line.startswith("| ")}
    assert "rms px" in rows["method"] and "adj px" in rows["method"]
    assert {"no alignment", "pairwise-rigid chain", "emalign"} <= set(rows)
    rms = {name: float(rows[name].split("|")[2]) for name in ("no alignment", "emalign")}
    assert rms["emalign"] < 0.5 * rms["no alignment"]
    assert "MPx/s" in result.output
    assert is_complete(out / "aligned.zarr")
    assert level0(out / "aligned.zarr").shape == (12, 128, 128)
    assert (out / "input.tif").exists() and (out / "accuracy.md").exists()
    assert (out / "aligned.zarr" / "qc.csv").exists()
    assert "40 nm sections at 10 x 10 nm pixels" in result.output
    assert open_stack(out / "input.tif").voxel_size == pytest.approx(DEMO_VOXEL_NM)
    aligned = open_stack(out / "aligned.zarr")
    assert (aligned.voxel_size, aligned.unit) == (pytest.approx(DEMO_VOXEL_NM), "nanometer")


# --- schedulers -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_processes_scheduler_gives_the_same_output_as_threads(stack, reference, tmp_path):
    """The network stage on a LocalCluster of 2 worker processes (one cluster start: about 10 s)."""
    ref, _ = reference
    prealigned = tmp_path / "prealigned.zarr"
    ok("prealign", stack, prealigned, *BLOCK)
    outputs = {}
    for spec in ("threads", "processes:2"):
        out = outputs[spec] = tmp_path / f"{spec.replace(':', '')}.zarr"
        shutil.copytree(prealigned, out)
        assert "estimate: 3 block(s) done" in ok("estimate", stack, out, *BLOCK, "--scheduler", spec).output
        ok("stitch", stack, out, *BLOCK)
        ok("refine", stack, out, *BLOCK)
        ok("polish", stack, out, *BLOCK)
        assert "output complete" in ok("render", stack, out, *BLOCK).output
        assert is_complete(out)
    threads, processes = outputs["threads"], outputs["processes:2"]
    np.testing.assert_allclose(global_fields(processes), global_fields(threads), rtol=0, atol=1e-3)
    diff = np.abs(level0(processes).astype(int) - level0(threads))
    # measured: identical; allow rounding of a float difference to flip a grey level on a few pixels
    assert diff.max() <= 1
    assert np.mean(diff > 0) < 1e-3
    np.testing.assert_allclose(global_fields(threads), global_fields(ref), rtol=0, atol=1e-3)


# --- the installed entry point ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_killed_align_resumes_to_the_uninterrupted_result(stack, reference, tmp_path):
    """The installed `emalign align` in a subprocess, SIGKILLed once estimate has finished a block, then rerun."""
    ref, _ = reference
    out = tmp_path / "killed.zarr"
    # threads:2: blocks run in pairs, so the kill lands inside estimate (and on 2 cores each gets one torch thread)
    command = [entry_point(), "align", str(stack), str(out), *BLOCK, "--scheduler", "threads:2"]
    markers = out / "stages" / "estimate"
    kill_when(command, lambda: markers.is_dir() and any(p.name.isdigit() for p in markers.iterdir()))

    assert not is_complete(out)
    done = np.asarray(zarr.open_group(str(out), mode="r")["stages/estimate"][:], bool)
    assert done.any()
    finished = [z for i, (a, b) in enumerate([(0, 4), (4, 8), (8, 12)]) if done[i] for z in range(a, b)]
    chunks = {z: out / "fields" / "relative" / str(z) / "0" / "0" / "0" for z in finished}
    stamps = {z: chunk.stat().st_mtime_ns for z, chunk in chunks.items()}

    rerun = ok(*command[1:])  # in this process: one subprocess start (torch import) is enough
    assert "sections: 12" in rerun.output and f"aligned OME-Zarr: {out}" in rerun.output
    assert is_complete(out)
    assert {z: chunk.stat().st_mtime_ns for z, chunk in chunks.items()} == stamps  # done blocks not recomputed
    np.testing.assert_array_equal(level0(out), level0(ref))
    np.testing.assert_array_equal(global_fields(out), global_fields(ref))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("voxel", "unit", "says"),
    [
        ("40,0,4", "nanometer", "--voxel-size"),
        ("40,-4,4", "nanometer", "--voxel-size"),
        ("40,4", "nanometer", "three numbers"),
        ("40,4,4", "meter", "not plausible"),
        ("40,4,4", "parsec", "parsec"),
    ],
)
def test_a_missing_zero_negative_or_absurd_voxel_size_is_a_one_line_error_and_writes_nothing(
    stack, tmp_path, voxel, unit, says
):
    out = tmp_path / "out.zarr"
    assert says in error_line(invoke("align", stack, out, "--voxel-size", voxel, "--unit", unit))
    assert not out.exists()


@pytest.mark.e2e
def test_align_says_which_pixel_size_it_assumed_and_records_it(stack, tmp_path):
    out = tmp_path / "out.zarr"
    result = ok("align", stack, out, "--block", "4", "--polish", "off", "--voxel-size", "40,5,5")
    assert "pixel size 5 nm (from --voxel-size); aligning at 2x block means (10 nm pixels)" in result.output
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["emalign"]["params"]["voxel_size"] == [40.0, 5.0, 5.0]
    assert attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [40.0, 5.0, 5.0]
    bare = ok("prealign", stack, tmp_path / "bare.zarr", "--block", "4")
    assert "estimated from the texture scale" in bare.output
