"""Turn ``--scheduler`` into a place to run dask tasks: one function for every stage.

* ``threads`` (default): dask's threaded scheduler in this process (``threads:N`` for N workers).
* ``sync``: one task at a time in this process (debugging).
* ``processes:N``: a ``distributed.LocalCluster`` of N single-threaded worker processes.
* ``tcp://host:port``: an existing dask scheduler.
* ``slurm``: a ``dask_jobqueue.SLURMCluster`` (``pip install emalign[cluster]``), configured by
  the standard jobqueue config file (``~/.config/dask/jobqueue.yaml``) and ``jobqueue_options``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import dask
from dask.delayed import Delayed

from emalign.errors import EmalignError

SCHEDULERS = "threads[:N], sync, processes[:N], tcp://host:port or slurm"


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


@contextlib.contextmanager
def scheduler(spec: str = "threads", jobqueue_options: dict | None = None) -> Iterator[dict]:
    """A context giving the keyword arguments for ``dask.compute`` under ``spec``.

    Yields ``{"scheduler": ..., "num_workers": ...}`` for local schedulers, or
    ``{"scheduler": client}`` for distributed ones (the client is closed on exit).
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
            print(f"dask dashboard: {client.dashboard_link}")
            yield {"scheduler": client}
        return
    if kind == "tcp":
        with Client(spec) as client:
            print(f"dask dashboard: {client.dashboard_link}")
            yield {"scheduler": client}
        return
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise EmalignError("--scheduler slurm needs dask-jobqueue: pip install 'emalign[cluster]'") from None
        options = dict(jobqueue_options or {})
        adapt = (options.pop("minimum_jobs", 0), options.pop("maximum_jobs", 4))
        with SLURMCluster(**options) as cluster, Client(cluster) as client:
            cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
            print(f"dask dashboard: {client.dashboard_link}")
            yield {"scheduler": client}
        return
    raise EmalignError(f"--scheduler {spec!r}: expected {SCHEDULERS}")


def run_tasks(tasks: Sequence[Delayed], compute_kwargs: dict, label: str, progress: bool = True) -> list:
    """Compute independent tasks with a progress bar; results come back in order."""
    if not tasks:
        return []
    client = compute_kwargs.get("scheduler")
    if progress and not isinstance(client, str):
        from distributed import progress as distributed_progress

        futures = client.compute(list(tasks))
        print(f"{label}:")
        distributed_progress(futures)
        return client.gather(futures)
    if progress:
        from dask.diagnostics import ProgressBar

        print(f"{label}:")
        with ProgressBar():
            return list(dask.compute(*tasks, **compute_kwargs))
    return list(dask.compute(*tasks, **compute_kwargs))
