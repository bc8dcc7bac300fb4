"""Crash safety: `emalign align` SIGKILLed inside each stage, then run again, gives the uninterrupted result.

The run under test is the real command in a subprocess, with one change that only slows it: every Zarr
array write first sleeps :data:`WRITE_DELAY` s, so each stage lasts long enough on any machine that the
kill lands inside it (at a seeded random delay after the stage is seen to begin, from its files). The
rerun happens in this process (one torch import is enough). Stack: 8 x 64 x 64, ``--block 2``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from helpers import kill_when, mounted, write_stack

from emalign.cli import main
from emalign.io import is_complete

SHAPE = (8, 64, 64)
ARGS = ["--block", "2", "--polish", "on", "--polish-patch", "32", "--quiet", "--scheduler", "threads:2"]
WRITE_DELAY = 0.03
BLOCKS = [(0, 2), (2, 4), (4, 6), (6, 8)]
STAGES = ("prealign", "estimate", "stitch", "refine", "polish")
"""The stages before render with completion markers, in order."""

SLOW_ALIGN = """
import sys, time, zarr
{prelude}
write = zarr.Array.__setitem__
def slow_write(self, key, value):
    time.sleep({delay})
    write(self, key, value)
zarr.Array.__setitem__ = slow_write
from emalign.cli import main
main(sys.argv[1:], prog_name="emalign")
"""


def chunk_files(folder: Path) -> list[Path]:
    """Chunk (or shard) files of a Zarr array folder (no metadata, no temporary files of unfinished writes)."""
    if not folder.is_dir():
        return []
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json" and "partial" not in p.name
    ]


def begun(out: Path, stage: str) -> bool:
    """Whether `stage` has visibly begun writing into `out`."""
    if stage == "prealign":
        return bool(chunk_files(out / "stages" / "prealign"))
    if stage == "estimate":
        return bool(chunk_files(out / "fields" / "relative"))
    if stage == "stitch":
        return bool(chunk_files(out / "fields" / "stitched"))
    if stage == "refine":
        return bool(chunk_files(out / "refine" / "pairs"))
    if stage == "polish":
        return bool(chunk_files(out / "polish" / "pairs"))
    if stage == "render":
        return bool(chunk_files(out / "done"))
    return is_complete(out)  # qc starts once the output is marked complete


def level0(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["0"][:])


def array(out: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")[name][:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_stack(tmp_path_factory.mktemp("input"), SHAPE, seed=4)


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    result = CliRunner().invoke(main, ["align", str(stack), str(out), *ARGS])
    assert result.exit_code == 0, result.output
    return out


def kill_inside(stage: str, stack: Path, out: Path, seed: int, args: list[str] = ARGS, prelude: str = "") -> str:
    """Start the slowed `emalign align` (after the Python lines `prelude`), SIGKILL it a random moment after `stage`
    begins; returns its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = SLOW_ALIGN.format(delay=WRITE_DELAY, prelude=prelude)
    command = [sys.executable, "-c", script, "align", str(stack), str(out), *args]
    return kill_when(command, lambda: begun(out, stage), after=random.Random(seed).uniform(0.0, 0.15), env=env)


def finished_work(out: Path) -> dict[str, list[Path]]:
    """The chunk files of work marked finished: a resumed run must leave these alone."""
    group = zarr.open_group(str(out), mode="r")
    done = {stage: np.asarray(group[f"stages/{stage}"][:], bool) for stage in STAGES}
    sections = np.asarray(group["done"][:], bool)
    files: dict[str, list[Path]] = {stage: [] for stage in (*STAGES, "render")}
    tiles, columns = len(done["stitch"]), group["fields/relative"].cdata_shape[-1]  # xy task tiles, row by row

    def field_chunks(name: str, sections: range, tile: int) -> list[Path]:
        rows, cols = divmod(tile, columns)
        chunks = [out / "fields" / name / str(z) / "0" / str(rows) / str(cols) for z in sections]
        return [chunk for chunk in chunks if chunk.is_file()]

    for index, (a, b) in enumerate(BLOCKS):
        if done["prealign"][index]:
            files["prealign"] += chunk_files(out / "coarse" / "pairs" / str(index))
        for tile in range(tiles):
            if done["estimate"][index * tiles + tile]:
                files["estimate"] += field_chunks("relative", range(a, b), tile)
        for stage in ("refine", "polish"):
            if done[stage][index]:
                files[stage] += chunk_files(out / stage / "pairs" / str(index))
    for tile in range(tiles):
        if done["stitch"][tile]:
            files["stitch"] += field_chunks("stitched", range(SHAPE[0]), tile)
    if done["refine"][-1]:
        files["refine"] += chunk_files(out / "fields" / "refined")
    if done["polish"][-1]:
        files["polish"] += chunk_files(out / "polish" / "shifts") + chunk_files(out / "fields" / "global")
    files["render"] = [f for z in np.flatnonzero(sections) for f in chunk_files(out / "0" / "c" / str(z))]
    return files


@pytest.mark.e2e
@pytest.mark.parametrize("stage", [*STAGES, "render", "qc"])
def test_align_killed_inside_a_stage_resumes_to_the_uninterrupted_output(stage, stack, reference, tmp_path):
    out = tmp_path / "killed.zarr"
    kill_inside(stage, stack, out, seed=len(stage))
    # the kill landed inside the stage: the stages before it finished, it did not
    marked = {name: array(out, f"stages/{name}") for name in STAGES}
    marked["render"] = array(out, "done")
    order = [*STAGES, "render"]
    for earlier in order[: order.index(stage) if stage in order else len(order)]:
        assert marked[earlier].all(), f"{earlier} had not finished when {stage} began"
    if stage in order:
        assert not marked[stage].all(), f"{stage} had already finished: the kill came too late"
    assert is_complete(out) == (stage == "qc")
    before = finished_work(out)
    stamps = {f: f.stat().st_mtime_ns for files in before.values() for f in files}

    result = CliRunner().invoke(main, ["align", str(stack), str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert is_complete(out)
    # nothing missing: every block of every stage and every section marked done
    for name in (*(f"stages/{stage}" for stage in STAGES), "done"):
        assert array(out, name).all(), name
    # nothing done twice: files of work finished before the kill were not rewritten
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    # the same result as the run that was never interrupted
    np.testing.assert_array_equal(level0(out), level0(reference))
    np.testing.assert_array_equal(array(out, "fields/global"), array(reference, "fields/global"))
    np.testing.assert_array_equal(array(out, "sections/flags"), array(reference, "sections/flags"))
    assert (out / "qc.csv").read_text() == (reference / "qc.csv").read_text()


TILED_ARGS = [*ARGS, "--task-tile", "32"]
"""As ARGS, with the estimate and stitch in 2 x 2 xy task tiles."""


@pytest.mark.e2e
def test_align_in_xy_task_tiles_killed_inside_the_estimate_resumes_to_the_uninterrupted_output(stack, tmp_path):
    reference = tmp_path / "reference.zarr"
    result = CliRunner().invoke(main, ["align", str(stack), str(reference), *TILED_ARGS])
    assert result.exit_code == 0, result.output
    out = tmp_path / "killed.zarr"
    kill_inside("estimate", stack, out, seed=5, args=TILED_ARGS)
    assert array(out, "stages/prealign").all()
    estimated = array(out, "stages/estimate")
    assert estimated.shape == (len(BLOCKS) * 4,) and not estimated.all()
    stamps = {f: f.stat().st_mtime_ns for f in finished_work(out)["estimate"]}

    result = CliRunner().invoke(main, ["align", str(stack), str(out), *TILED_ARGS])
    assert result.exit_code == 0, result.output
    assert is_complete(out) and array(out, "stages/estimate").all() and array(out, "stages/stitch").all()
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # finished (block, tile) tasks not redone
    np.testing.assert_array_equal(level0(out), level0(reference))
    np.testing.assert_array_equal(array(out, "fields/global"), array(reference, "fields/global"))


@pytest.mark.e2e
def test_a_run_killed_while_creating_its_arrays_resumes(stack, reference, tmp_path):
    """Killed after the OME-Zarr group and some pipeline arrays were made, before the stage markers."""
    from emalign.io import create_array, open_stack
    from emalign.pipeline import AlignParams
    from emalign.pipeline.store import Workspace

    out = tmp_path / "half-made.zarr"
    params = AlignParams(block=2, polish="on", polish_patch=32)  # as ARGS
    Workspace.create(open_stack(stack), out, params)
    group = zarr.open_group(str(out), mode="r+")
    for name in ("stages", "fields", "coarse"):
        del group[name]  # as if killed right after sections/* were created
    create_array(out, "stages/prealign", (len(BLOCKS),), (1,), bool)
    result = CliRunner().invoke(main, ["align", str(stack), str(out), *ARGS])
    assert result.exit_code == 0, result.output
    assert is_complete(out)
    np.testing.assert_array_equal(level0(out), level0(reference))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fill(path: Path, leave: int) -> None:
    """Fill the file system of `path` with the file `path`, then give back `leave` bytes of it."""
    with open(path, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
        handle.truncate(max(0, handle.tell() - leave))


SMALL_CHUNKS = (1, 16, 16)
"""Level chunks small enough that a 64 x 64 section of the test stack spans 2 x 2 shards of 2 x 2 chunks."""


@pytest.mark.e2e
def test_a_render_killed_with_sharded_sections_resumes_to_the_same_output_on_threads_and_processes(stack, tmp_path):
    killed, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    args = [*ARGS, "--shard", "32"]
    prelude = f"import emalign.io; emalign.io.SECTION_CHUNKS = {SMALL_CHUNKS}"
    uninterrupted = SLOW_ALIGN.format(delay=0, prelude=prelude)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run in the same layout (its sections rendered in the same shard-sized tiles)
    subprocess.run([sys.executable, "-c", uninterrupted, "align", str(stack), str(whole), *args], env=env, check=True)
    kill_inside("render", stack, killed, seed=3, args=args, prelude=prelude)
    level = zarr.open_array(str(killed / "0"), mode="r")
    assert (level.chunks, level.shards) == (SMALL_CHUNKS, (1, 32, 32))
    done = array(killed, "done")
    assert not done.all() and not is_complete(killed)
    for z in np.flatnonzero(done):  # a section marked done is whole: every shard of it written
        np.testing.assert_array_equal(level[z], level0(whole)[z])
        assert len(chunk_files(killed / "0" / "c" / str(z))) == 4
    for scheduler in ("threads:2", "processes:2"):
        out = tmp_path / f"{scheduler.replace(':', '')}.zarr"
        shutil.copytree(killed, out)
        result = CliRunner().invoke(main, ["render", str(stack), str(out), *args, "--scheduler", scheduler])
        assert result.exit_code == 0, result.output
        assert "output complete" in result.output and is_complete(out)
        np.testing.assert_array_equal(level0(out), level0(whole))
        assert sorted(len(chunk_files(out / "0" / "c" / str(z))) for z in range(SHAPE[0])) == [4] * SHAPE[0]
        assert not list(out.rglob("*.partial"))  # a shard is replaced whole, through a temporary file


@pytest.mark.e2e
def test_a_disk_full_while_rendering_is_one_line_and_marks_only_whole_sections_done(stack, reference, tmp_path):
    with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        out = disk / "out.zarr"
        for stage in STAGES:
            result = CliRunner().invoke(main, [stage, str(stack), str(out), *ARGS])
            assert result.exit_code == 0, result.output
        fill(disk / "filler", leave=12 * 1024)  # room for a few 4 KiB pages: a section or two, then no space
        result = CliRunner().invoke(main, ["render", str(stack), str(out), *ARGS])
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line and line.startswith(f"error: {out}: No space left on device (writing ")
        assert re.search(r"\(writing (0/c/\d+/0/0|done/\d+)\)", line)  # the file of the section that did not fit
        assert line.endswith("the output is incomplete: fix that and run the same command to resume")
        done = array(out, "done")
        assert not done.all() and not is_complete(out)
        for z in np.flatnonzero(done):  # nothing half-written is marked done
            np.testing.assert_array_equal(level0(out)[z], level0(reference)[z])
        (disk / "filler").unlink()
        result = CliRunner().invoke(main, ["align", str(stack), str(out), *ARGS])
        assert result.exit_code == 0, result.output
        assert is_complete(out)
        np.testing.assert_array_equal(level0(out), level0(reference))
