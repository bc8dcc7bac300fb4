"""Soak test: a long synthetic stack through `emalign align --scheduler processes:2`, memory and file handles watched.

The command runs as a subprocess; every ``--every`` seconds this script samples its whole process tree (the CLI,
the dask nannies and workers): resident memory (RSS, and USS, the memory only that process holds), open file
descriptors and the stage the run is in (from the output's completion markers). A leak shows as RSS or open files
that keep growing with the sections done instead of levelling off. Prints a Markdown table and writes it to
``benchmarks/results/soak.md``.

    python benchmarks/soak.py                       # 2000 x 64 x 64, processes:2, --block 16
    python benchmarks/soak.py --sections 500 --every 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

from emalign.io import is_complete
from emalign.synth import demo_stack

RESULTS = Path(__file__).parent / "results" / "soak.md"
MIB = 1024 * 1024


def markers(folder: Path) -> int:
    """How many chunks of a Zarr bool marker array exist (one per finished block or section)."""
    try:
        return sum(1 for p in folder.iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return 0


def stage_of(out: Path, blocks: int, sections: int) -> tuple[str, int, int]:
    """(stage, finished, total) of a run writing into ``out``, from its completion markers."""
    if not (out / "stages").is_dir():
        return "start", 0, 1
    for stage, folder, total in (
        ("prealign", out / "stages" / "prealign", blocks),
        ("estimate", out / "stages" / "estimate", blocks),
        ("stitch", out / "stages" / "stitch", 1),
        ("render", out / "done", sections),
    ):
        done = markers(folder)
        if done < total:
            return stage, done, total
    return "qc", 1, 1


def sample(root: psutil.Process) -> dict | None:
    """RSS, USS and open files of ``root`` and all its descendants; None once it has gone."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    rss, uss, fds, largest, alive = 0, 0, 0, 0, 0
    for process in processes:
        try:
            memory = process.memory_full_info()
            count = process.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        alive += 1
        rss += memory.rss
        uss += memory.uss
        fds += count
        largest = max(largest, memory.rss)
    return {"processes": alive, "rss": rss / MIB, "uss": uss / MIB, "largest": largest / MIB, "fds": fds}


def run(stack: Path, out: Path, args: argparse.Namespace, blocks: int) -> tuple[list[dict], int, float, str]:
    """Run the alignment, sampling as it goes; returns the samples, exit status, seconds and the output's tail."""
    command = [sys.executable, "-m", "emalign.cli", "align", str(stack), str(out)]
    command += ["--scheduler", args.scheduler, "--block", str(args.block), "--quiet", "--device", "cpu"]
    log = out.parent / "align.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        samples = []
        while process.poll() is None:
            found = sample(root)
            if found is not None:
                stage, done, total = stage_of(out, blocks, args.sections)
                samples.append({"t": time.perf_counter() - start, "stage": stage, "done": done, "of": total, **found})
            time.sleep(args.every)
    seconds = time.perf_counter() - start
    return samples, process.returncode, seconds, log.read_text()[-2000:]


def table(samples: list[dict], rows: int) -> str:
    """About ``rows`` samples, evenly spaced in time, plus the last one of every stage."""
    keep = set(np.linspace(0, len(samples) - 1, min(rows, len(samples))).round().astype(int).tolist())
    keep |= {i for i in range(len(samples) - 1) if samples[i]["stage"] != samples[i + 1]["stage"]}
    lines = [
        "| t s | stage | progress | processes | RSS total MiB | USS total MiB | largest process RSS MiB | open fds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i in sorted(keep):
        s = samples[i]
        lines.append(
            f"| {s['t']:.0f} | {s['stage']} | {s['done']}/{s['of']} | {s['processes']} | {s['rss']:.0f} "
            f"| {s['uss']:.0f} | {s['largest']:.0f} | {s['fds']} |"
        )
    return "\n".join(lines)


def growth(samples: list[dict], stage: str, key: str, per: int = 1) -> tuple[float, float, float]:
    """(first, last, least-squares slope per 1000 sections) of ``key`` over the samples of ``stage``
    (``per``: sections per progress marker, the block size for block stages)."""
    points = [(s["done"] * per, s[key]) for s in samples if s["stage"] == stage]
    if len(points) < 3:
        return float("nan"), float("nan"), float("nan")
    x, y = np.array(points, dtype=float).T
    slope = float(np.polyfit(x, y, 1)[0]) * 1000 if np.ptp(x) > 0 else float("nan")
    return float(y[0]), float(y[-1]), slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--scheduler", default="processes:2")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--rows", type=int, default=16, help="samples in the printed table")
    args = parser.parse_args()
    shape = (args.sections, args.size, args.size)
    blocks = -(-args.sections // args.block)
    folder = Path(tempfile.mkdtemp(prefix="emalign-soak-"))
    try:
        stack = folder / "stack.tif"
        made = time.perf_counter()
        tifffile.imwrite(stack, demo_stack(shape, seed=11)[1].stack, photometric="minisblack")
        made = time.perf_counter() - made
        out = folder / "out.zarr"
        samples, status, seconds, tail = run(stack, out, args, blocks)
        complete = is_complete(out)
        files = sum(1 for p in out.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if status != 0 or not complete:
        raise SystemExit(f"the run failed (exit {status}, complete {complete}):\n{tail}")
    full = max(s["processes"] for s in samples)  # the CLI with the whole cluster up
    running = [s for s in samples if s["processes"] == full]
    first, last = running[0], running[-1]
    peak = max(samples, key=lambda s: s["rss"])
    est_rss = growth(samples, "estimate", "rss", args.block)
    est_uss = growth(samples, "estimate", "uss", args.block)
    ren_rss = growth(samples, "render", "rss")
    est_fds = growth(samples, "estimate", "fds", args.block)
    mpx = shape[0] * shape[1] * shape[2] / 1e6
    load = os.getloadavg()
    summary = [
        "| measure | value |",
        "| --- | --- |",
        f"| wall time (stack made in {made:.0f} s, not counted) | {seconds:.0f} s ({args.sections / seconds:.1f} "
        f"sections/s, {mpx / seconds:.3f} MPx/s) |",
        f"| exit status, output complete, files in the output | {status}, {complete}, {files} |",
        f"| samples (every {args.every:g} s) | {len(samples)} |",
        f"| peak RSS of the process tree | {peak['rss']:.0f} MiB at {peak['t']:.0f} s ({peak['stage']}) |",
        f"| RSS / USS of the tree, first -> last sample with all {full} processes up | {first['rss']:.0f} / "
        f"{first['uss']:.0f} MiB ({first['t']:.0f} s, {first['stage']}) -> {last['rss']:.0f} / {last['uss']:.0f} "
        f"MiB ({last['t']:.0f} s, {last['stage']}) |",
        f"| estimate: RSS first -> last, slope | {est_rss[0]:.0f} -> {est_rss[1]:.0f} MiB, "
        f"{est_rss[2]:+.1f} MiB per 1000 sections |",
        f"| estimate: USS first -> last, slope | {est_uss[0]:.0f} -> {est_uss[1]:.0f} MiB, "
        f"{est_uss[2]:+.1f} MiB per 1000 sections |",
        f"| render: RSS first -> last, slope | {ren_rss[0]:.0f} -> {ren_rss[1]:.0f} MiB, "
        f"{ren_rss[2]:+.1f} MiB per 1000 sections |",
        f"| open fds of the tree, first -> last sample with all {full} processes up | {first['fds']} -> "
        f"{last['fds']} (after the run: the CLI alone {samples[-1]['fds']}) |",
        f"| estimate: open fds first -> last, slope | {est_fds[0]:.0f} -> {est_fds[1]:.0f}, "
        f"{est_fds[2]:+.1f} per 1000 sections |",
        f"| most open fds at any sample | {max(s['fds'] for s in samples)} |",
    ]
    note = (
        f"`emalign align` of a synthetic stack {shape[0]} x {shape[1]} x {shape[2]} (`demo_stack`, one TIFF) with "
        f"`--scheduler {args.scheduler} --block {args.block} --device cpu`, run as a subprocess and sampled every "
        f"{args.every:g} s with psutil over its process tree (the CLI, the dask nannies and workers). CPU, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), shared with other work: load "
        f"average at the end {load[0]:.1f}. RSS counts shared pages once per process; USS is the memory only that "
        "process holds (their sum is what the run really takes)."
    )
    text = (
        f"# Soak test (`python benchmarks/soak.py`)\n\n{note}\n\n{chr(10).join(summary)}\n\n"
        f"Samples (evenly spaced, plus the last one of each stage):\n\n{table(samples, args.rows)}\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
