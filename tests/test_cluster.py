"""The pipeline on dask clusters: ``--scheduler``, SLURM job settings, completion markers, lost workers.

Stacks are tiny (12 x 96 x 96, ``block=4``: three blocks per stage). The SLURM tests submit real jobs and skip,
naming the reason, when no SLURM controller answers (CI starts a one-node SLURM with ``.ci/start-slurm``).
Every task gets one torch thread (``one_torch_thread``; workers: ``threads_per_task``), so outputs compare exactly.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
import zarr
from click.testing import CliRunner
from helpers import entry_point, write_stack

import emalign.cluster as cluster
import emalign.pipeline.run as pipeline
from emalign.cli import main
from emalign.cluster import run_tasks, scheduler, slurm_cluster, slurm_options, slurm_problem
from emalign.errors import EmalignError
from emalign.io import is_complete, open_stack
from emalign.pipeline import STAGES, AlignParams, Workspace, align, run_stage

SHAPE = (12, 96, 96)
PARAMS = AlignParams(block=4, polish="on", polish_patch=32)  # polish: the stage runs its blocks
ROOT = Path(__file__).resolve().parents[1]
JOBQUEUE_EXAMPLE = ROOT / "workflows" / "jobqueue.yaml"
SLURM_PROBLEM = slurm_problem()
needs_slurm = pytest.mark.skipif(SLURM_PROBLEM is not None, reason=f"no SLURM here: {SLURM_PROBLEM}")


def arrays(out: Path) -> dict[str, np.ndarray]:
    """Every array an alignment writes (the aligned stack, fields, prealignment, markers)."""
    group = zarr.open_group(str(out), mode="r")
    names = ["0", "done", "coarse/matrices", "coarse/pairs", "coarse/affine", "coarse/margins", "refine/pairs"]
    names += ["polish/pairs", "polish/shifts"]
    names += [f"fields/{name}" for name in ("relative", "stitched", "refined", "global")]
    marked = ("prealign", "estimate", "stitch", "refine", "polish")
    names += ["sections/stats", *(f"stages/{stage}" for stage in marked)]
    return {name: np.asarray(group[name][:]) for name in names}


def assert_same_alignment(out: Path, reference: Path) -> None:
    assert is_complete(out)
    got, expected = arrays(out), arrays(reference)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert (out / "qc.csv").read_text() == (reference / "qc.csv").read_text()


def files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder, by relative path (qc.png left out: matplotlib stamps it)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".png"}


def stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_stack(tmp_path_factory.mktemp("input"), SHAPE, seed=2)


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> Path:
    """The stack aligned by the default threaded scheduler."""
    out = tmp_path_factory.mktemp("threads") / "out.zarr"
    align(stack, out, PARAMS, "threads", "cpu", progress=False)
    return out


@pytest.fixture
def jobqueue_example():
    """The dask config as it is with workflows/jobqueue.yaml as the user's jobqueue config file."""
    pytest.importorskip("dask_jobqueue")  # first: importing it adds its defaults to the config
    settings = yaml.safe_load(JOBQUEUE_EXAMPLE.read_text())["jobqueue"]["slurm"]
    with dask.config.set({f"jobqueue.slurm.{key}": value for key, value in settings.items()}):
        yield settings


# --- SLURM job settings -----------------------------------------------------------------------------------


def test_slurm_options_keep_only_the_given_settings_under_dask_jobqueue_names():
    assert slurm_options() == {"minimum_jobs": 1, "maximum_jobs": 8}
    options = slurm_options(
        cores=4,
        memory="16GiB",
        processes=2,
        walltime="01:00:00",
        partition="gpu",
        account="lab",
        job_extra=("--gres=gpu:1",),
        prologue=("module load cuda",),
        min_jobs=0,
        max_jobs=3,
    )
    assert options == {
        "cores": 4,
        "memory": "16GiB",
        "processes": 2,
        "walltime": "01:00:00",
        "queue": "gpu",
        "account": "lab",
        "job_extra_directives": ["--gres=gpu:1"],
        "job_script_prologue": ["module load cuda"],
        "minimum_jobs": 0,
        "maximum_jobs": 3,
    }


@pytest.mark.parametrize(("low", "high"), [(3, 2), (-1, 2), (0, 0)])
def test_slurm_job_limits_must_be_ordered_and_allow_a_job(low, high):
    with pytest.raises(EmalignError, match="--slurm-min-jobs"):
        slurm_options(min_jobs=low, max_jobs=high)


def test_the_jobqueue_config_example_sets_the_slurm_job_script(jobqueue_example):
    with slurm_cluster(slurm_options()) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -J emalign-worker" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --mem=32G" in script
    assert "#SBATCH -t 04:00:00" in script
    assert "--nthreads 4 --memory-limit 16.00GiB --nworkers 2" in script  # 2 processes of 4 threads, 16 GiB each
    assert "--local-directory /tmp" in script and "--death-timeout 120" in script
    assert sys.executable in script
    assert "#SBATCH -p" not in script and "#SBATCH -A" not in script


def test_cli_slurm_options_override_the_config_file_and_add_to_its_lists(jobqueue_example):
    configured = {"jobqueue.slurm.job-extra-directives": ["--qos=normal"], "jobqueue.slurm.job-script-prologue": []}
    with dask.config.set(configured):
        options = slurm_options(
            cores=2,
            memory="4GiB",
            processes=1,
            walltime="00:20:00",
            partition="debug",
            account="lab",
            job_extra=["--gres=gpu:1"],
            prologue=["export EMALIGN_TEST=1"],
        )
        with slurm_cluster(options) as cluster:
            script = cluster.job_script()
    for line in ("--cpus-per-task=2", "--mem=4G", "-t 00:20:00", "-p debug", "-A lab", "--qos=normal", "--gres=gpu:1"):
        assert f"#SBATCH {line}" in script
    assert "--nthreads 2" in script and "--nworkers" not in script
    assert script.index("export EMALIGN_TEST=1") < script.index("distributed.cli.dask_worker")


def test_a_slurm_cluster_without_cores_or_memory_names_the_options_and_the_config_file():
    pytest.importorskip("dask_jobqueue")
    with (
        dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}),
        pytest.raises(EmalignError, match="--slurm-cores") as info,
    ):
        slurm_cluster(slurm_options())
    assert "jobqueue.yaml" in str(info.value) and "\n" not in str(info.value)


def test_slurm_scheduler_where_sbatch_is_missing_is_a_one_line_error(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, sinfo or scancel
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, ["align", str(stack), str(out), "--block", "4", "--scheduler", "slurm"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "error: --scheduler slurm: `sbatch` is not on PATH (is this a SLURM submit host?)"
    ]
    assert not is_complete(out)


def test_stage_help_lists_the_slurm_options_under_their_own_heading():
    for command in ("align", "estimate", "stitch"):
        text = CliRunner().invoke(main, [command, "--help"]).output
        options, slurm = text.split("SLURM options")
        assert "--scheduler" in options and "--slurm" not in options
        for name in ("cores", "memory", "processes", "walltime", "partition", "account", "job-extra", "prologue"):
            assert f"--slurm-{name}" in slurm
        assert "--slurm-min-jobs" in slurm and "--slurm-max-jobs" in slurm


# --- completion markers and retries -----------------------------------------------------------------------


@pytest.mark.e2e
def test_block_tasks_whose_marker_is_set_do_not_run_again(reference, tmp_path):
    """A task rerun by dask for a lost worker (its result was held there) finds its marker and returns."""
    out = tmp_path / "done.zarr"
    shutil.copytree(reference, out)
    before = stamps(out)
    time.sleep(0.01)
    for index in range(3):
        for stage in ("prealign", "estimate", "refine", "polish", "render"):
            assert pipeline._task(str(out), stage, index, 0, "cpu", 1, False) is None
    assert pipeline._task(str(out), "stitch", 0, 0, "cpu", 1, False) is None
    assert stamps(out) == before


@pytest.mark.e2e
def test_a_retried_block_rewrites_byte_identical_chunks(reference, tmp_path):
    """Blocks whose markers were lost (a task killed after writing, before marking) are redone to the same bytes."""
    out = tmp_path / "retried.zarr"
    shutil.copytree(reference, out)
    before = files(out)
    ws = Workspace(out)
    for stage in ("prealign", "estimate", "refine", "polish"):
        ws.array(f"stages/{stage}")[1] = False
    ws.array("stages/stitch")[0] = False
    ws.writer.done[4:8] = False
    for stage in ("prealign", "estimate", "stitch", "refine", "polish", "render"):
        assert run_stage(stage, ws, "4:8", {"scheduler": "sync", "num_workers": 1}, "cpu", progress=False)
    assert files(out) == before
    assert is_complete(out)


# --- the same output on every scheduler -------------------------------------------------------------------


@pytest.mark.e2e
def test_processes_scheduler_aligns_like_threads_and_returns_nothing_to_the_client(
    stack, reference, tmp_path, monkeypatch
):
    gathered, original = [], pipeline.run_tasks

    def recording(tasks, compute, label, progress=True):
        results = original(tasks, compute, label, progress)
        gathered.extend(results)
        return results

    monkeypatch.setattr(pipeline, "run_tasks", recording)
    out = tmp_path / "processes.zarr"
    align(stack, out, PARAMS, "processes:2", "cpu", progress=False)
    assert_same_alignment(out, reference)
    assert len(gathered) == 3 + 3 + 1 + 3 + 3 + 3  # prealign, estimate, stitch, refine, polish, render tasks
    assert gathered == [None] * len(gathered)


@pytest.mark.e2e
@needs_slurm
def test_slurm_scheduler_aligns_like_threads(stack, reference, tmp_path):
    """`emalign align --scheduler slurm` with workflows/jobqueue.yaml as the config file, jobs resized by options."""
    config = tmp_path / "dask"
    config.mkdir()
    shutil.copy(JOBQUEUE_EXAMPLE, config / "jobqueue.yaml")
    env = {**os.environ, "DASK_CONFIG": str(config), "DASK_JOBQUEUE__SLURM__INTERFACE": "lo", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "slurm.zarr"
    sizes = ["--slurm-cores", "1", "--slurm-processes", "1", "--slurm-memory", "3GiB", "--slurm-walltime", "00:15:00"]
    command = [entry_point(), "align", stack, out, "--block", "4", "--polish", "on", "--polish-patch", "32"]
    command += ["--device", "cpu", "--scheduler", "slurm", *sizes]
    command += ["--slurm-max-jobs", "2", "--slurm-job-extra=--job-name=emalign-test", "--quiet"]
    command = [str(part) for part in command]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SLURM cluster: 1..2 job(s)" in result.stdout and "--cpus-per-task=1" in result.stdout
    assert "--job-name=emalign-test" in result.stdout and "dask dashboard: http://127.0.0.1:" in result.stdout
    assert list(tmp_path.glob("slurm-*.out")), "no SLURM job ran a worker"
    assert_same_alignment(out, reference)


# --- a lost worker ----------------------------------------------------------------------------------------


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) one worker process that is running a task, once some but not all estimate blocks are done."""

    def __init__(self, client, out: Path, blocks: int):
        super().__init__(daemon=True)
        self.client, self.out, self.blocks = client, out, blocks
        self.killed: int | None = None
        self.done_at_kill: list[bool] = []
        self.stamps_at_kill: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        markers = self.out / "stages" / "estimate"
        while not self.stop.is_set():
            done = [(markers / str(i)).exists() for i in range(self.blocks)]
            busy = [address for address, keys in self.client.processing().items() if keys]
            if any(done) and not all(done) and busy:
                self.stamps_at_kill = stamps(self.out / "fields" / "relative")
                pid = self.client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                self.killed, self.done_at_kill = pid, done
                return
            time.sleep(0.002)


@pytest.mark.e2e
def test_a_worker_killed_mid_run_still_gives_the_complete_correct_output(stack, tmp_path):
    params = AlignParams(block=2)  # 6 blocks: the kill lands while blocks are still queued
    reference = tmp_path / "reference.zarr"
    align(stack, reference, params, "sync", "cpu", progress=False)
    out = tmp_path / "killed.zarr"
    ws = Workspace.create(open_stack(stack), out, params)
    with scheduler("processes:2") as compute:
        client = compute["scheduler"]
        killer = WorkerKiller(client, out, blocks=6)
        for stage in STAGES:
            if stage == "estimate":
                killer.start()
            run_stage(stage, ws, None, compute, "cpu", progress=False)
            if stage == "estimate":
                killer.stop.set()
                killer.join()
        survivors = set(client.run(os.getpid).values())
    assert killer.killed is not None, "estimate ended before a worker could be killed"
    assert any(killer.done_at_kill) and not all(killer.done_at_kill)
    assert killer.killed not in survivors and len(survivors) == 2  # the nanny started a new worker
    finished = [z for i, done in enumerate(killer.done_at_kill) if done for z in (2 * i, 2 * i + 1)]
    written = stamps(out / "fields" / "relative")
    for z in finished:  # blocks finished before the kill were not computed again
        chunk = next(name for name in killer.stamps_at_kill if name.split("/")[0] == str(z))
        assert written[chunk] == killer.stamps_at_kill[chunk]
    assert_same_alignment(out, reference)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- progress -----------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_progress_off_a_terminal_is_plain_lines_per_10_percent_with_an_eta():
    stream = io.StringIO()
    tasks = [dask.delayed(nap)(0.01 * (i % 3), dask_key_name=f"nap-{i}") for i in range(20)]
    results = run_tasks(tasks, {"scheduler": "threads", "num_workers": 2}, "estimate", stream=stream)
    assert results == [0.01 * (i % 3) for i in range(20)]
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("estimate: 0/20 blocks, 0 %, ") and lines[0].endswith("ETA unknown")
    assert re.fullmatch(r"estimate: 20/20 blocks, 100 %, \d+ s elapsed", lines[-1])
    counts = [int(re.match(r"estimate: (\d+)/20 blocks", line).group(1)) for line in lines]
    assert counts == sorted(counts) and len(lines) <= 12  # at the start, each further 10 %, the end
    assert all(re.search(r", ETA \d+ s$", line) for line in lines[1:-1])


def test_progress_off_a_terminal_prints_every_interval_while_a_task_runs(monkeypatch):
    monkeypatch.setattr(cluster, "REPORT_EVERY", 0.3)
    stream = io.StringIO()
    run_tasks([dask.delayed(nap)(1.5)], {"scheduler": "sync", "num_workers": 1}, "render", stream=stream)
    lines = stream.getvalue().splitlines()
    waiting = [line for line in lines if line.startswith("render: 0/1 blocks, 0 %")]
    assert len(waiting) >= 3 and lines[-1].startswith("render: 1/1 blocks, 100 %")


def test_progress_on_a_terminal_redraws_one_line():
    stream = Terminal()
    run_tasks(
        [dask.delayed(nap)(0.01) for _ in range(5)], {"scheduler": "threads", "num_workers": 2}, "polish", stream=stream
    )
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 6
    assert text.rstrip("\n").split("\r")[-1].startswith("polish: 5/5 blocks, 100 %")


def test_progress_on_a_distributed_client_counts_each_finished_task():
    from distributed import Client

    stream = io.StringIO()
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        tasks = [dask.delayed(nap)(0.01) for _ in range(10)]
        assert run_tasks(tasks, {"scheduler": client}, "refine", stream=stream) == [0.01] * 10
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("refine: 0/10 blocks") and lines[-1].startswith("refine: 10/10 blocks, 100 %")
    counts = {int(re.match(r"refine: (\d+)/10", line).group(1)) for line in lines}
    assert counts == set(range(11))  # a line per task: each is 10 %


def fail(_: int) -> None:
    raise ValueError("this block failed")


def test_progress_of_a_stage_whose_task_fails_does_not_claim_the_end():
    stream = io.StringIO()
    tasks = [dask.delayed(nap)(0.01), dask.delayed(fail)(1)]
    with pytest.raises(ValueError, match="this block failed"):
        run_tasks(tasks, {"scheduler": "sync", "num_workers": 1}, "prealign", stream=stream)
    assert "prealign: 0/2 blocks" in stream.getvalue() and "100 %" not in stream.getvalue()
