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
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

import dask
from dask.callbacks import Callback
from dask.delayed import Delayed

from emalign.errors import EmalignError

SCHEDULERS = "threads[:N], sync, processes[:N], tcp://host:port or slurm"
RETRIES = 2
"""Extra tries of a failed task on a distributed cluster; safe because block tasks rewrite whole chunks."""
JOBQUEUE_CONFIG = "~/.config/dask/jobqueue.yaml"
REPORT_EVERY = 10.0
"""Seconds between the progress lines printed when stdout is not a terminal (also one line per 10 % of the tasks)."""


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


class TaskProgress:
    """Finished tasks of one stage out of ``total``, with the time elapsed and an ETA.

    On a terminal: one line redrawn in place (carriage return) every ``tick`` s and at each finished task.
    Otherwise (a log file, a SLURM job's output): a plain line when the stage starts, every ``every`` s (default
    :data:`REPORT_EVERY`), at each further 10 % of the tasks and at the end, e.g.
    ``estimate: 12/40 blocks, 30 %, 41 s elapsed, ETA 95 s``.
    """

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        every: float | None = None,
        tick: float = 1.0,
        unit: str = "blocks",
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every, self.tick = REPORT_EVERY if every is None else every, tick
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = self._printed_at = time.perf_counter()
        self._printed_step = -1
        self._thread = threading.Thread(target=self._ticks, daemon=True)

    def line(self) -> str:
        """``label: done/total unit, P %, T s elapsed, ETA E s`` (no ETA before the first task or at the end)."""
        elapsed = time.perf_counter() - self._start
        text = f"{self.label}: {self.done}/{self.total} {self.unit}, {100 * self.done // self.total} %, "
        text += f"{elapsed:.0f} s elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {math.ceil(elapsed / self.done * (self.total - self.done))} s"
        elif self.done == 0:
            text += ", ETA unknown"
        return text

    def advance(self, count: int = 1) -> None:
        """Count ``count`` more finished tasks."""
        with self._lock:
            self.done = min(self.total, self.done + count)
            self._report()

    def _report(self, force: bool = False) -> None:
        """Write the line if due (called with the lock held)."""
        now = time.perf_counter()
        step = 10 * self.done // self.total
        if self.tty:
            self.stream.write(f"\r{self.line()}\x1b[K")
        elif force or step > self._printed_step or now - self._printed_at >= self.every:
            self.stream.write(f"{self.line()}\n")
            self._printed_at, self._printed_step = now, step
        else:
            return
        self.stream.flush()

    def _ticks(self) -> None:
        while not self._stop.wait(self.tick if self.tty else min(self.tick, self.every)):
            with self._lock:
                self._report()

    def __enter__(self) -> TaskProgress:
        with self._lock:
            self._report(force=True)
        self._thread.start()
        return self

    def __exit__(self, kind, *_) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            if kind is None:  # every task finished
                self.done = self.total
                if self.tty or self._printed_step < 10:
                    self._report(force=True)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()


class _CountFinished(Callback):
    """Advances a :class:`TaskProgress` as dask's local scheduler finishes each of ``keys``."""

    def __init__(self, keys: Sequence, progress: TaskProgress) -> None:
        super().__init__()
        self.keys, self.progress = set(keys), progress

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        if key in self.keys:
            self.progress.advance()


def run_tasks(
    tasks: Sequence[Delayed], compute_kwargs: dict, label: str, progress: bool = True, stream: TextIO | None = None
) -> list:
    """Compute independent tasks, with per-task progress and an ETA (:class:`TaskProgress` on ``stream``, default
    stdout) unless ``progress`` is False; results come back in order.

    On a distributed client a task that fails is tried again up to :data:`RETRIES` times, and one whose
    worker dies is rescheduled by dask.
    """
    if not tasks:
        return []
    shown = TaskProgress(label, len(tasks), stream) if progress else contextlib.nullcontext()
    client = compute_kwargs.get("scheduler")
    if not isinstance(client, str):
        from distributed import as_completed

        futures = client.compute(list(tasks), retries=RETRIES)
        with shown:
            for future in as_completed(futures):
                if future.status == "error":
                    break  # gather raises it
                if progress:
                    shown.advance()
            return client.gather(futures)
    local = {key: compute_kwargs[key] for key in ("scheduler", "num_workers") if key in compute_kwargs}
    counting = _CountFinished([task.key for task in tasks], shown) if progress else contextlib.nullcontext()
    with shown, counting:
        return list(dask.compute(*tasks, **local))
