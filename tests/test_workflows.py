"""The SLURM recipe in workflows/slurm: stage.sbatch (one stage, an array task's z-range) and submit.sh (the chain).

Without SLURM the scripts run here (``SLURM_ARRAY_TASK_ID`` set by hand, ``EMALIGN_LOCAL=1``); with SLURM
(CI starts one with ``.ci/start-slurm``) submit.sh goes through real ``sbatch``, array jobs and dependencies.
A stand-in ``emalign`` that records its arguments checks the z-ranges and the order of the jobs quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import write_stack

from emalign.cluster import slurm_problem
from emalign.io import is_complete
from emalign.pipeline import AlignParams, align
from emalign.pipeline.stages import TABLE

SHAPE = (12, 96, 96)
SLURM = Path(__file__).resolve().parents[1] / "workflows" / "slurm"
OPTIONS = ("--block", "4", "--polish", "on", "--polish-patch", "32")
"""Plan options of the workflow runs (polish on: its array job does real work)."""
SLURM_PROBLEM = slurm_problem()


def run(script: str, *args: object, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a workflow script with bash; this interpreter's environment first on PATH, OMP_NUM_THREADS=1."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    full_env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", **(env or {})}
    command = ["bash", str(SLURM / script), *(str(a) for a in args)]
    return subprocess.run(command, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_stack(tmp_path_factory.mktemp("input"), SHAPE, seed=2)


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> Path:
    """`emalign align` with :data:`OPTIONS` of the stack, in this process."""
    out = tmp_path_factory.mktemp("reference") / "out.zarr"
    align(stack, out, AlignParams(block=4, polish="on", polish_patch=32), "threads", "cpu", progress=False)
    return out


@pytest.fixture
def recorder(tmp_path) -> tuple[Path, Path]:
    """A stand-in `emalign` (a Python script, as pip installs them) that appends its arguments to a log."""
    log = tmp_path / "calls.log"
    script = tmp_path / "emalign"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nopen({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    )
    script.chmod(0o755)
    return script, log


def assert_same_alignment(out: Path, reference: Path) -> None:
    assert is_complete(out)
    got, expected = zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r")
    for name in ("0", "fields/relative", "fields/global", "coarse/matrices", "sections/flags"):
        np.testing.assert_array_equal(np.asarray(got[name][:]), np.asarray(expected[name][:]), err_msg=name)
    assert (out / "qc.csv").read_text() == (reference / "qc.csv").read_text()


# --- stage.sbatch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "z_range"), [("0", "0:256"), ("3", "768:1024")])
def test_stage_sbatch_turns_the_array_task_id_into_a_z_range(recorder, task, z_range):
    script, log = recorder
    env = {"EMALIGN": str(script), "SLURM_ARRAY_TASK_ID": task, "EMALIGN_SECTIONS_PER_TASK": "256"}
    result = run("stage.sbatch", "estimate", "in.zarr", "out.zarr", "--block", "16", env=env)
    assert result.returncode == 0, result.stderr
    expected = f"estimate in.zarr out.zarr --z-range {z_range} --scheduler threads:1 --quiet --block 16"
    assert log.read_text().splitlines() == [expected]
    assert f"task {task}" in result.stdout


def test_stage_sbatch_outside_an_array_takes_the_whole_stack_on_the_jobs_cpus(recorder):
    script, log = recorder
    env = {"EMALIGN": str(script), "SLURM_CPUS_PER_TASK": "6", "SLURM_JOB_ID": "41"}
    result = run("stage.sbatch", "stitch", "in.zarr", "out.zarr", "--spring", "0.1", env=env)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["stitch in.zarr out.zarr --scheduler threads:6 --quiet --spring 0.1"]
    assert "job 41" in result.stdout


def test_stage_sbatch_refuses_an_array_task_without_its_size_or_a_short_command(recorder):
    script, log = recorder
    result = run(
        "stage.sbatch", "render", "in.zarr", "out.zarr", env={"EMALIGN": str(script), "SLURM_ARRAY_TASK_ID": "2"}
    )
    assert result.returncode != 0 and "EMALIGN_SECTIONS_PER_TASK" in result.stderr
    result = run("stage.sbatch", "render", "in.zarr", env={"EMALIGN": str(script)})
    assert result.returncode == 2 and result.stderr.startswith("usage: stage.sbatch STAGE IN OUT")
    assert not log.exists()


# --- submit.sh --------------------------------------------------------------------------------------------


def test_submit_sh_without_arguments_prints_its_usage():
    result = run("submit.sh")
    assert result.returncode == 2
    assert "Usage: submit.sh IN OUT" in result.stderr and "EMALIGN_SECTIONS_PER_TASK" in result.stderr


@pytest.mark.e2e
def test_submit_sh_chains_the_stages_over_whole_blocks(recorder, stack, tmp_path):
    """12 sections, --block 5, 7 sections per task asked: rounded to 10, so 2 array tasks, no block split."""
    script, log = recorder
    env = {"EMALIGN": str(script), "EMALIGN_LOCAL": "1", "EMALIGN_SECTIONS_PER_TASK": "7"}
    result = run("submit.sh", stack, tmp_path / "out.zarr", "--block", "5", "--device", "cpu", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{job} local" for job in ("init", "prealign", "estimate", "stitch", "refine", "polish", "render", "qc")
    ]
    common = f"{stack} {tmp_path / 'out.zarr'}"
    tail = "--scheduler threads:1 --quiet --block 5 --device cpu"
    ranges = ["--z-range 0:10 ", "--z-range 10:20 "]
    expected = [f"prealign {common} --scheduler threads:1 --quiet --z-range 0:1 --block 5 --device cpu"]
    for stage, parts in (
        ("prealign", ranges),
        ("estimate", ranges),
        ("stitch", [""]),
        ("refine", ranges),
        ("polish", ranges),
        ("render", ranges),
        ("qc", [""]),
    ):
        expected += [f"{stage} {common} {part}{tail}" for part in parts]
    assert log.read_text().splitlines() == expected
    assert (tmp_path / "out.zarr.logs").is_dir()


def test_submit_sh_takes_its_chain_from_the_stage_table_and_adds_adapt_only_when_asked(recorder, stack, tmp_path):
    """The jobs are the table's stages in order (a stage of z-blocks as an array of tasks); adapt, switched by
    --adapt, is one job after prealign when --adapt N > 0 is given."""
    script, log = recorder
    env = {"EMALIGN": str(script), "EMALIGN_LOCAL": "1", "EMALIGN_SECTIONS_PER_TASK": "12"}
    stages = [spec.name for spec in TABLE]
    for adapt, jobs in ((["--adapt", "0"], [name for name in stages if name != "adapt"]), (["--adapt=5"], stages)):
        log.unlink(missing_ok=True)
        result = run("submit.sh", stack, tmp_path / "out.zarr", *adapt, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"{job} local" for job in ("init", *jobs)]
        assert [line.split()[0] for line in log.read_text().splitlines()] == [stages[0], *jobs]


@pytest.mark.e2e
def test_submit_sh_without_slurm_runs_the_recipe_here_and_aligns_like_emalign_align(stack, reference, tmp_path):
    out = tmp_path / "local.zarr"
    env = {"EMALIGN_LOCAL": "1", "EMALIGN_SECTIONS_PER_TASK": "8"}
    result = run("submit.sh", stack, out, *OPTIONS, "--device", "cpu", env=env)
    assert result.returncode == 0, result.stderr
    for stage in ("prealign", "estimate", "polish", "render"):
        for z_range in ("0:8", "8:16"):
            assert f"emalign {stage} {stack} {out} --z-range {z_range}" in result.stderr
    assert "output complete" in result.stderr and "sections: 12; flagged: 0" in result.stderr
    assert_same_alignment(out, reference)


def wait_for_jobs(jobs: dict[str, str], logs: Path, timeout: float = 900) -> None:
    """Wait until none of the jobs is queued or running; fail (cancelling them) on a timeout or a dead dependency."""
    ids = ",".join(jobs.values())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T %r"], capture_output=True, text=True).stdout
        if not queue.strip():
            return
        if "DependencyNeverSatisfied" in queue:
            break
        time.sleep(1)
    subprocess.run(["scancel", *jobs.values()], check=False)
    text = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"the jobs did not finish:\n{queue}\n{text}")


@pytest.mark.e2e
@pytest.mark.skipif(SLURM_PROBLEM is not None, reason=f"no SLURM here: {SLURM_PROBLEM}")
def test_submit_sh_through_sbatch_aligns_like_emalign_align(stack, reference, tmp_path):
    out = tmp_path / "slurm.zarr"
    env = {"EMALIGN_SBATCH": "--cpus-per-task=1 --mem=2G --time=15", "EMALIGN_SECTIONS_PER_TASK": "8"}
    result = run("submit.sh", stack, out, *OPTIONS, "--device", "cpu", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = dict(line.split() for line in result.stdout.splitlines())
    assert list(jobs) == ["init", "prealign", "estimate", "stitch", "refine", "polish", "render", "qc"]
    assert all(job.isdigit() for job in jobs.values()), jobs
    logs = tmp_path / "slurm.zarr.logs"
    wait_for_jobs(jobs, logs)
    names = sorted(p.name for p in logs.glob("*.log"))
    for name in ("prealign", "estimate", "refine", "polish", "render"):  # arrays of two tasks
        assert [n for n in names if n.startswith(f"emalign-{name}-")] == [
            f"emalign-{name}-{jobs[name]}_{task}.log" for task in (0, 1)
        ]
    qc_log = (logs / f"emalign-qc-{jobs['qc']}.log").read_text()
    assert "sections: 12; flagged: 0" in qc_log
    assert_same_alignment(out, reference)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
