"""Cluster throughput: the same synthetic stack aligned by 1 and 2 dask worker processes (and SLURM jobs when present).

For each scheduler it starts the cluster (timed on its own), runs every stage (prealign, estimate, stitch,
render, qc) into a fresh output, and reads each worker's peak resident memory. Prints a Markdown table and
writes it to ``benchmarks/results/cluster.md``.

    python benchmarks/cluster.py                     # 48 x 384 x 384, processes:1, processes:2 (+ slurm)
    python benchmarks/cluster.py --sections 96 --size 512 --no-slurm
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import dask
import tifffile

from emalign.cluster import cores, scheduler, slurm_options, slurm_problem
from emalign.io import open_stack
from emalign.pipeline import STAGES, AlignParams, Workspace, run_stage
from emalign.synth import demo_stack

RESULTS = Path(__file__).parent / "results" / "cluster.md"


def peak_rss_mib() -> float:
    """Peak resident memory of the calling process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    spec: str, stack: Path, out: Path, params: AlignParams, jobqueue: dict | None, threads: int | None = None
) -> dict:
    """Align ``stack`` into ``out`` under ``spec``; seconds to start the cluster, per stage, and worker memory.

    ``threads``: torch threads per network task instead of the scheduler's choice.
    """
    ws = Workspace.create(open_stack(stack), out, params, overwrite=True)
    start = time.perf_counter()
    with scheduler(spec, jobqueue) as compute:
        compute = {**compute, "threads_per_task": threads or compute["threads_per_task"]}
        client = compute["scheduler"]
        expected = (jobqueue or {}).get("minimum_jobs", 0)
        if expected:
            client.wait_for_workers(expected, timeout=600)
        started = time.perf_counter()
        seconds = {}
        for stage in STAGES:
            begin = time.perf_counter()
            run_stage(stage, ws, None, compute, "cpu", progress=False)
            seconds[stage] = time.perf_counter() - begin
        workers = client.run(peak_rss_mib)
        threads = compute["threads_per_task"]
    return {
        "start": started - start,
        "seconds": seconds,
        "workers": len(workers),
        "threads": threads,
        "worker_rss": max(workers.values()),
    }


def table(rows: list[tuple[str, dict]], shape: tuple[int, int, int]) -> str:
    mpx = shape[0] * shape[1] * shape[2] / 1e6
    base = sum(rows[0][1]["seconds"].values())
    lines = [
        "| scheduler | workers | torch threads / task | cluster start s | estimate s | all stages s | MPx/s "
        "| speed-up | peak RSS per worker MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows:
        total = sum(row["seconds"].values())
        lines.append(
            f"| {name} | {row['workers']} | {row['threads']} | {row['start']:.1f} | {row['seconds']['estimate']:.1f} "
            f"| {total:.1f} | {mpx / total:.2f} | {base / total:.2f}x | {row['worker_rss']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=48)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--no-slurm", action="store_true", help="leave out the SLURM row even where SLURM answers")
    args = parser.parse_args()
    shape = (args.sections, args.size, args.size)
    params = AlignParams(block=args.block)
    specs: list[tuple[str, str, dict | None, int | None]] = [
        ("processes:1", "processes:1", None, None),
        ("processes:1, 1 torch thread", "processes:1", None, 1),
        ("processes:2", "processes:2", None, None),
    ]
    problem = "left out (--no-slurm)" if args.no_slurm else slurm_problem()
    if problem is None:
        jobs = slurm_options(cores=1, processes=1, memory="4GiB", walltime="01:00:00", min_jobs=2, max_jobs=2)
        specs.append(("slurm, 2 jobs of 1 core", "slurm", jobs, None))
    folder = Path(tempfile.mkdtemp(prefix="emalign-cluster-bench-"))
    try:
        path = folder / "stack.tif"
        tifffile.imwrite(path, demo_stack(shape, seed=3)[1].stack, photometric="minisblack")
        rows = []
        for index, (name, spec, jobqueue, threads) in enumerate(specs):
            if spec == "slurm":
                import dask_jobqueue  # noqa: F401  (first: importing it adds its defaults to the dask config)
            # one machine: the scheduler and the SLURM jobs' workers talk over loopback; job logs in the scratch folder
            settings = {"jobqueue.slurm.interface": "lo", "jobqueue.slurm.log-directory": str(folder)}
            with dask.config.set(settings if spec == "slurm" else {}):
                row = measure(spec, path, folder / f"{index}.zarr", params, jobqueue, threads)
            rows.append((name, row))
            print(f"{name}: {sum(row['seconds'].values()):.1f} s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    note = (
        f"Stack {shape[0]} x {shape[1]} x {shape[2]} (synthetic, `demo_stack`), `--block {args.block}`, CPU, "
        f"{cores()} cores ({platform.processor() or platform.machine()}), load average at the end "
        f"{load[0]:.1f}. `processes:N` is a dask LocalCluster of N single-threaded worker processes; each "
        "network task gets cores / N torch threads (one row pins it to 1). Speed-up is relative to the first "
        "row; cluster start (worker processes, or SLURM jobs being scheduled and started) is not in the stage times."
    )
    if problem is not None:
        note += f" SLURM row: {problem}."
    text = f"# Cluster throughput (`python benchmarks/cluster.py`)\n\n{note}\n\n{table(rows, shape)}\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
