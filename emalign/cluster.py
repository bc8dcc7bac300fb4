"""Turn ``--scheduler`` into a place to run dask tasks: one function for every stage.

* ``threads`` (default): dask's threaded scheduler in this process (``threads:N`` for N workers).
* ``sync``: one task at a time in this process (debugging).
* ``processes:N``: a ``distributed.LocalCluster`` of N single-threaded worker processes.
* ``tcp://host:port``: an existing dask scheduler.
* ``slurm``: a ``dask_jobqueue.SLURMCluster`` (``pip install emalign[cluster]``) that scales adaptively
  between ``minimum_jobs`` and ``maximum_jobs`` SLURM jobs. Job settings come from :func:`slurm_options`
  (the CLI's ``--slurm-*`` options) first, then from the standard jobqueue config file
  (``~/.config/dask/jobqueue.yaml``, key ``jobqueue.slurm``; ``workflows/jobqueue.yaml`` is an example).

Every pipeline task is a z-block that reads its input from the stack and the output folder and writes
its result straight to Zarr (tasks return ``None``: nothing large travels back to the client), so a
failed task may be retried (:data:`RETRIES`) and a lost worker's finished blocks are not lost.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence

import dask
from dask.delayed import Delayed

from emalign.errors import EmalignError

SCHEDULERS = "threads[:N], sync, processes[:N], tcp://host:port or slurm"
RETRIES = 2
"""Extra tries of a failed task on a distributed cluster; safe because block tasks rewrite whole chunks."""
JOBQUEUE_CONFIG = "~/.config/dask/jobqueue.yaml"


def cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_scheduler(spec: str) -> None:
    """Refuse a malformed ``--scheduler`` before anything is created."""
    kind, _, arg = spec.partition(":")
    if kind in ("threads", "processes", "sync") and (not arg or (arg.isdigit() and int(arg) > 0)):
        return
    if kind in ("tcp", "slurm") and (kind == "slurm") == (not arg):
        return
    raise EmalignError(f"--scheduler {spec!r}: expected {SCHEDULERS}")


def slurm_options(
    cores: int | None = None,
    memory: str | None = None,
    processes: int | None = None,
    walltime: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    job_extra: Sequence[str] = (),
    prologue: Sequence[str] = (),
    min_jobs: int = 1,
    max_jobs: int = 8,
) -> dict:
    """``SLURMCluster`` keyword arguments (plus ``minimum_jobs``/``maximum_jobs``) from the ``--slurm-*`` options.

    ``None`` or empty leaves a setting to the jobqueue config file; ``job_extra`` (``#SBATCH`` lines) and
    ``prologue`` (shell lines run before the worker starts) are added to the config file's lists.
    """
    if min_jobs < 0 or max_jobs < max(min_jobs, 1):
        raise EmalignError(f"--slurm-min-jobs {min_jobs} / --slurm-max-jobs {max_jobs}: need 0 <= min <= max, max >= 1")
    given = {
        "cores": cores,
        "memory": memory,
        "processes": processes,
        "walltime": walltime,
        "queue": partition,
        "account": account,
        "job_extra_directives": list(job_extra) or None,
        "job_script_prologue": list(prologue) or None,
    }
    options = {key: value for key, value in given.items() if value is not None}
    return {**options, "minimum_jobs": min_jobs, "maximum_jobs": max_jobs}


def slurm_problem(timeout: float = 20.0) -> str | None:
    """Why SLURM cannot take jobs from here (no ``sbatch``/``sinfo``, or no controller answers); None if it can."""
    for tool in ("sbatch", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (is this a SLURM submit host?)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"the SLURM controller did not answer `sinfo` within {timeout:g} s"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"`sinfo` failed: {lines[-1] if lines else f'exit status {result.returncode}'}"
    return None


def slurm_cluster(options: dict | None = None):
    """A ``dask_jobqueue.SLURMCluster`` (no jobs yet) from :func:`slurm_options`' keywords and the jobqueue config."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise EmalignError("--scheduler slurm needs dask-jobqueue: pip install 'emalign[cluster]'") from None
    options = {key: value for key, value in (options or {}).items() if key not in ("minimum_jobs", "maximum_jobs")}
    for key in ("job_extra_directives", "job_script_prologue"):
        if key in options:
            configured = dask.config.get(f"jobqueue.slurm.{key.replace('_', '-')}", None) or []
            options[key] = [*configured, *options[key]]
    try:
        return SLURMCluster(**options)
    except ValueError as err:
        reason = str(err).strip().splitlines()[0]
        raise EmalignError(
            f"--scheduler slurm: {reason} (give --slurm-cores and --slurm-memory, or set them in {JOBQUEUE_CONFIG})"
        ) from None


def _announce(client, what: str) -> None:
    print(f"{what}; dask dashboard: {client.dashboard_link}", flush=True)


@contextlib.contextmanager
def scheduler(spec: str = "threads", jobqueue_options: dict | None = None) -> Iterator[dict]:
    """A context giving the compute arguments for :func:`run_tasks` under ``spec``.

    Yields ``{"scheduler": "threads" | "sync", "num_workers": N}`` for local schedulers, or
    ``{"scheduler": client, "threads_per_task": T}`` for distributed ones (T: the CPU threads one task may
    use on its worker; the client and any cluster it started are closed on exit). ``jobqueue_options``:
    :func:`slurm_options` for ``slurm``, ignored otherwise.
    """
    check_scheduler(spec)
    kind, _, arg = spec.partition(":")
    if kind in ("threads", "sync"):
        workers = int(arg) if arg else (1 if kind == "sync" else cores())
        yield {"scheduler": "threads" if kind == "threads" else "sync", "num_workers": workers}
        return
    from distributed import Client, LocalCluster

    if kind == "processes":
        workers = int(arg) if arg else cores()
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster,
            Client(cluster) as client,
        ):
            _announce(client, f"local cluster of {workers} worker process(es)")
            yield {"scheduler": client, "threads_per_task": max(1, cores() // workers)}
        return
    if kind == "tcp":
        with Client(spec) as client:
            _announce(client, f"dask scheduler {spec}")
            yield {"scheduler": client, "threads_per_task": 1}
        return
    problem = slurm_problem()
    if problem:
        raise EmalignError(f"--scheduler slurm: {problem}")
    options = dict(jobqueue_options or slurm_options())
    minimum, maximum = options.get("minimum_jobs", 1), options.get("maximum_jobs", 8)
    with slurm_cluster(options) as cluster, Client(cluster) as client:
        cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
        directives = " ".join(
            line[len("#SBATCH ") :] for line in cluster.job_script().splitlines() if line.startswith("#SBATCH")
        )
        _announce(client, f"SLURM cluster: {minimum}..{maximum} job(s) of `{directives}`")
        # dask-jobqueue gives each worker cores / processes threads: one CPU per concurrent task
        yield {"scheduler": client, "threads_per_task": 1}


def run_tasks(tasks: Sequence[Delayed], compute_kwargs: dict, label: str, progress: bool = True) -> list:
    """Compute independent tasks (with a progress bar); results come back in order.

    On a distributed client a task that fails is tried again up to :data:`RETRIES` times, and one whose
    worker dies is rescheduled by dask.
    """
    if not tasks:
        return []
    client = compute_kwargs.get("scheduler")
    if not isinstance(client, str):
        futures = client.compute(list(tasks), retries=RETRIES)
        if progress:
            from distributed import progress as distributed_progress

            print(f"{label}:")
            distributed_progress(futures)
        return client.gather(futures)
    local = {key: compute_kwargs[key] for key in ("scheduler", "num_workers") if key in compute_kwargs}
    if progress:
        from dask.diagnostics import ProgressBar

        print(f"{label}:")
        with ProgressBar():
            return list(dask.compute(*tasks, **local))
    return list(dask.compute(*tasks, **local))
