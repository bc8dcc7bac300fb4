"""End-to-end throughput and peak memory of `emalign align` (read, every stage, write).

    python benchmarks/speed.py [--sections 100] [--size 448] [--repeat 3] [--grow 10] [--xy-grow 2]

Builds a procedural EM-like stack with known misalignment (Zarr input), runs `emalign align`
in a fresh process per run, and reports the median time of the pipeline (read, prealign,
estimate, stitch, refine, polish, render, write, qc: the ``time:`` line `align` prints), the median wall time of
the whole process (adding Python's start and the imports, ~2.5 s), MPx/s of input for both,
and the peak resident memory of that process. ``--grow N`` adds a row for a stack N times longer in z
(the same sections repeated), to show that memory stays flat as stacks grow in z; ``--xy-grow N`` a
row with sections N times larger per side. Every row also times the pairwise-rigid chain
(:func:`emalign.evaluate.rigid_chain`, in this process, on the same sections read into memory) and
gives emalign's time as a multiple of it.
Writes a Markdown table to benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from emalign import evaluate, synth

RESULTS = Path(__file__).parent / "results"

_CHILD = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
print(done.stdout)
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.returncode)
"""


def make_input(path: Path, sections: int, size: int, repeat_z: int = 1) -> tuple[int, int, int]:
    """A misaligned procedural stack as a Zarr array (1 x size x size chunks), repeated ``repeat_z`` times in z."""
    _, case = synth.demo_stack((sections, size, size), seed=0, z_step=4.0)
    shape = (sections * repeat_z, size, size)
    array = zarr.open_array(str(path), mode="w", shape=shape, chunks=(1, size, size), dtype=np.uint8, zarr_format=2)
    for r in range(repeat_z):
        array[r * sections : (r + 1) * sections] = case.stack if r % 2 == 0 else case.stack[::-1]
    return shape


def time_rigid_chain(src: Path) -> float:
    """Seconds of the pairwise-rigid chain baseline on the stack at ``src`` (read into memory first)."""
    stack = np.asarray(zarr.open_array(str(src), mode="r")[:])
    start = time.perf_counter()
    evaluate.rigid_chain(stack)
    return time.perf_counter() - start


def run_align(src: Path, out: Path, extra: list[str]) -> tuple[float, float, float]:
    """Pipeline seconds (as `align` prints them), process seconds and peak RSS (MiB) of one `emalign align`."""
    cmd = [sys.executable, "-m", "emalign.cli", "align", str(src), str(out), "--overwrite", "--quiet", *extra]
    output = subprocess.run([sys.executable, "-c", _CHILD, *cmd], capture_output=True, text=True, check=True).stdout
    seconds, rss_kib, code = output.splitlines()[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"emalign align failed ({code}) on {src}")
    pipeline = re.search(r"^time: ([0-9.]+)s", output, re.MULTILINE)
    if pipeline is None:
        raise RuntimeError(f"emalign align printed no time line:\n{output}")
    return float(pipeline.group(1)), float(seconds), float(rss_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=100)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (median reported)")
    parser.add_argument("--grow", type=int, default=10, help="z growth factor of the second row (0: none)")
    parser.add_argument("--xy-grow", type=int, default=2, help="side growth factor of the third row (0: none)")
    parser.add_argument("--extra", default="", help="extra `emalign align` options, e.g. '--device cuda'")
    parser.add_argument("--out", default=str(RESULTS / "speed.md"))
    args = parser.parse_args()
    rows = []
    grown = [(1, 1)] + [(args.grow, 1)] * (args.grow > 1) + [(1, args.xy_grow)] * (args.xy_grow > 1)
    with tempfile.TemporaryDirectory() as tmp:
        for z_grow, xy_grow in grown:
            src = Path(tmp) / f"input-{z_grow}-{xy_grow}.zarr"
            shape = make_input(src, args.sections, args.size * xy_grow, z_grow)
            repeat = args.repeat if (z_grow, xy_grow) == (1, 1) else 1
            runs = [run_align(src, Path(tmp) / "out.zarr", args.extra.split()) for _ in range(repeat)]
            chain = statistics.median(time_rigid_chain(src) for _ in range(repeat))
            pipeline = statistics.median(r[0] for r in runs)
            process = statistics.median(r[1] for r in runs)
            mpx = np.prod(shape) / 1e6
            rows.append(
                {
                    "shape": shape,
                    "mpx": mpx,
                    "pipeline_s": pipeline,
                    "process_s": process,
                    "mpx_per_s": mpx / pipeline,
                    "process_mpx_per_s": mpx / process,
                    "peak_mib": max(r[2] for r in runs),
                    "runs": len(runs),
                    "chain_s": chain,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        "emalign align, end to end (read, prealign, estimate, stitch, refine, polish, render, write, qc), "
        + time.strftime("%Y-%m-%d"),
        "",
        "| stack (z, y, x) | MPx | runs | pipeline s | MPx/s | process s | MPx/s (process) | peak RSS MiB "
        "| rigid chain s | x rigid chain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {' x '.join(map(str, r['shape']))} | {r['mpx']:.1f} | {r['runs']} | {r['pipeline_s']:.1f} | "
            f"{r['mpx_per_s']:.2f} | {r['process_s']:.1f} | {r['process_mpx_per_s']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['chain_s']:.1f} | {r['pipeline_s'] / r['chain_s']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
