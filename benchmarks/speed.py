"""End-to-end throughput and peak memory of `emalign align` (read, every stage, write).

    python benchmarks/speed.py [--sections 100] [--size 448] [--repeat 3] [--grow 10] [--xy-grow 2]
    python benchmarks/speed.py --grow 0 --xy-grow 0 --sizes 2048:12,8192:6,16384:3 --schedulers threads,processes:2

Builds a procedural EM-like stack with known misalignment (Zarr input), runs `emalign align`
in a fresh process per run, and reports the median time of the pipeline (read, prealign,
estimate, stitch, refine, polish, render, write, qc: the ``time:`` line `align` prints), the median wall time of
the whole process (adding Python's start and the imports, ~2.5 s), MPx/s of input for both,
and the peak resident memory of the whole process tree (sampled; worker processes included). ``--grow N`` adds
a row for a stack N times longer in z (the same sections repeated), to show that memory stays flat as stacks
grow in z; ``--xy-grow N`` a row with sections N times larger per side. ``--sizes SIZE:SECTIONS,...`` adds rows
of large sections made in bounded memory: a 1024^2 procedural volume tiled periodically to SIZE^2 (mirrored tiles
would give the spectrum a mirror symmetry that makes rotations ambiguous) and placed by a
random rigid map per section (15 px, 1 deg, its linear trend along z removed: :func:`jitter_matrices`), written
tile by tile; those rows also report the output's files per
section at level 0 and the adjacent-section correlation of the output against the truth's (the tiled volume
itself). ``--schedulers`` runs every row under each scheduler. Every row also times the pairwise-rigid chain
(:func:`emalign.evaluate.rigid_chain_fields`, in this process, on the same sections read into memory; skipped for the
``--sizes`` rows, whose sections do not fit comfortably) and gives emalign's time as a multiple of it.
Writes a Markdown table to benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from emalign import evaluate, synth
from emalign.io import open_stack
from emalign.metrics import adjacent_correlation

RESULTS = Path(__file__).parent / "results"

_CHILD = """
import subprocess, sys, time
import psutil
start = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, text=True)
watched, peak = psutil.Process(process.pid), 0
while process.poll() is None:
    try:
        tree = [watched, *watched.children(recursive=True)]
        peak = max(peak, sum(p.memory_info().rss for p in tree))
    except psutil.Error:
        pass
    time.sleep(0.2)
seconds = time.perf_counter() - start
print(process.stdout.read())
print(seconds, peak // 1024, process.returncode)
"""

TILE_BASE = 1024
"""Side of the procedural volume that ``--sizes`` rows tile."""


def make_input(path: Path, sections: int, size: int, repeat_z: int = 1) -> tuple[int, int, int]:
    """A misaligned procedural stack as a Zarr array (1 x size x size chunks), repeated ``repeat_z`` times in z."""
    _, case = synth.demo_stack((sections, size, size), seed=0, z_step=4.0)
    shape = (sections * repeat_z, size, size)
    array = zarr.open_array(str(path), mode="w", shape=shape, chunks=(1, size, size), dtype=np.uint8, zarr_format=2)
    for r in range(repeat_z):
        array[r * sections : (r + 1) * sections] = case.stack if r % 2 == 0 else case.stack[::-1]
    return shape


def _tiled_section(base: np.ndarray, matrix: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """The ``shape`` region at ``origin`` of the periodically tiled ``base`` (Y, X) pulled by the affine ``matrix``
    (2, 3)."""
    yy, xx = np.mgrid[origin[0] : origin[0] + shape[0], origin[1] : origin[1] + shape[1]].astype(np.float32)
    coords = np.einsum("ij,jyx->iyx", matrix[:, :2], np.stack([yy, xx])) + matrix[:, 2, None, None]
    return np.clip(ndimage.map_coordinates(base, coords, order=1, mode="grid-wrap"), 0, 255).astype(np.uint8)


def jitter_matrices(rng: np.random.Generator, sections: int, centre: tuple[float, float]) -> np.ndarray:
    """``(sections, 2, 3)`` rigid pull maps about ``centre``: shifts of N(0, 15) px per axis and angles of N(0, 1)
    degree, each with its linear trend along z removed. The pipeline keeps a smooth z-trend of the sections'
    motion as content drift (the prealignment's and the refine stage's detrending), and over a few sections the
    linear part of independent draws is such a trend: left in, it stays in the output and the output's adjacent
    correlation measures it rather than the alignment."""
    shifts, angles = rng.normal(0.0, 15.0, (sections, 2)), np.deg2rad(rng.normal(0.0, 1.0, sections))
    z = np.arange(sections, dtype=float)
    design = np.stack([np.ones_like(z), z], axis=1)
    params = np.column_stack([shifts, angles])
    params -= design @ np.linalg.lstsq(design, params, rcond=None)[0]
    c = np.asarray(centre)
    matrices = []
    for dy, dx, theta in params:
        a = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        matrices.append(np.concatenate([a, (c - a @ c + [dy, dx])[:, None]], axis=1))
    return np.array(matrices)


def make_tiled_input(path: Path, sections: int, size: int, seed: int = 0, tile: int = 2048) -> float:
    """A ``sections x size x size`` misaligned stack written tile by tile (bounded memory); returns the truth's
    mean adjacent-section correlation (the tiled volume, aligned)."""
    base = synth.em_texture((sections, TILE_BASE, TILE_BASE), seed=seed, z_step=4.0).astype(np.float32)
    matrices = jitter_matrices(np.random.default_rng(seed), sections, ((size - 1) / 2, (size - 1) / 2))
    chunks = (1, min(size, 1024), min(size, 1024))
    array = zarr.open_array(
        str(path), mode="w", shape=(sections, size, size), chunks=chunks, dtype=np.uint8, zarr_format=2
    )
    for z, matrix in enumerate(matrices):
        for y0 in range(0, size, tile):
            for x0 in range(0, size, tile):
                shape = (min(tile, size - y0), min(tile, size - x0))
                array[z, y0 : y0 + shape[0], x0 : x0 + shape[1]] = _tiled_section(base[z], matrix, (y0, x0), shape)
    return float(np.nanmean(adjacent_correlation(base)))


def output_check(out: Path, sections: int) -> tuple[float, float]:
    """Files per section of the output's level 0, and its mean adjacent-section correlation (central half, every
    4th pixel)."""
    files = sum(1 for f in (out / "0").rglob("*") if f.is_file())
    level0 = open_stack(out).data
    _, height, width = level0.shape
    centre = (slice(height // 4, 3 * height // 4, 4), slice(width // 4, 3 * width // 4, 4))
    stack = np.stack([np.asarray(level0[z][centre]) for z in range(sections)])
    return files / sections, float(np.nanmean(adjacent_correlation(stack)))


def time_rigid_chain(src: Path) -> float:
    """Seconds of the pairwise-rigid chain baseline on the stack at ``src`` (read into memory first)."""
    stack = np.asarray(zarr.open_array(str(src), mode="r")[:])
    start = time.perf_counter()
    evaluate.rigid_chain_fields(stack)
    return time.perf_counter() - start


def run_align(src: Path, out: Path, extra: list[str], pythonpath: str | None = None) -> tuple[float, float, float]:
    """Pipeline seconds (as `align` prints them), process seconds and peak RSS (MiB) of one `emalign align` (of the
    package at ``pythonpath`` when given), run in ``out``'s folder."""
    cmd = [sys.executable, "-m", "emalign.cli", "align", str(src), str(out), "--overwrite", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, *cmd], capture_output=True, text=True, check=True, env=env, cwd=out.parent
    ).stdout
    seconds, rss_kib, code = output.splitlines()[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"emalign align failed ({code}) on {src}")
    pipeline = re.search(r"^time: ([0-9.]+)s", output, re.MULTILINE)
    if pipeline is None:
        raise RuntimeError(f"emalign align printed no time line:\n{output}")
    return float(pipeline.group(1)), float(seconds), float(rss_kib) / 1024


def _row(shape: tuple[int, int, int], runs: list[tuple[float, float, float]], chain: float | None, **extra) -> dict:
    pipeline = statistics.median(r[0] for r in runs)
    process = statistics.median(r[1] for r in runs)
    mpx = float(np.prod(shape)) / 1e6
    row = {
        "shape": shape,
        "mpx": mpx,
        "pipeline_s": pipeline,
        "process_s": process,
        "mpx_per_s": mpx / pipeline,
        "process_mpx_per_s": mpx / process,
        "peak_mib": max(r[2] for r in runs),
        "runs": len(runs),
        "chain_s": chain,
        **extra,
    }
    print(json.dumps(row), flush=True)
    return row


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [(int(size), int(sections)) for size, sections in (item.split(":") for item in text.split(",") if item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=100)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (median reported)")
    parser.add_argument("--grow", type=int, default=10, help="z growth factor of the second row (0: none)")
    parser.add_argument("--xy-grow", type=int, default=2, help="side growth factor of the third row (0: none)")
    parser.add_argument("--sizes", default="", help="SIZE:SECTIONS,... rows of tiled large sections")
    parser.add_argument("--schedulers", default="threads", help="comma-separated --scheduler values, one row each")
    parser.add_argument("--extra", default="", help="extra `emalign align` options, e.g. '--device cuda'")
    parser.add_argument("--out", default=str(RESULTS / "speed.md"))
    args = parser.parse_args()
    rows = []
    grown = [(1, 1)] + [(args.grow, 1)] * (args.grow > 1) + [(1, args.xy_grow)] * (args.xy_grow > 1)
    schedulers = args.schedulers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.zarr"
        for z_grow, xy_grow in grown:
            src = Path(tmp) / f"input-{z_grow}-{xy_grow}.zarr"
            shape = make_input(src, args.sections, args.size * xy_grow, z_grow)
            repeat = args.repeat if (z_grow, xy_grow) == (1, 1) else 1
            chain = statistics.median(time_rigid_chain(src) for _ in range(repeat))
            for spec in schedulers:
                runs = [run_align(src, out, ["--scheduler", spec, *args.extra.split()]) for _ in range(repeat)]
                rows.append(_row(shape, runs, chain, scheduler=spec))
        for size, sections in _parse_sizes(args.sizes):
            src = Path(tmp) / f"tiled-{size}.zarr"
            truth = make_tiled_input(src, sections, size)
            for spec in schedulers:
                runs = [run_align(src, out, ["--scheduler", spec, *args.extra.split()])]
                files, corr = output_check(out, sections)
                rows.append(
                    _row((sections, size, size), runs, None, scheduler=spec, files=files, corr=corr, truth=truth)
                )
    lines = [
        "emalign align, end to end (read, prealign, estimate, stitch, refine, polish, render, write, qc), "
        + time.strftime("%Y-%m-%d"),
        "",
        "| stack (z, y, x) | scheduler | MPx | runs | pipeline s | MPx/s | process s | MPx/s (process) "
        "| x MPx/s of the first row | peak RSS MiB (process tree) | rigid chain s | x rigid chain "
        "| files / section (level 0) | adjacent corr (truth) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chain = f"{r['chain_s']:.1f} | {r['pipeline_s'] / r['chain_s']:.1f}" if r["chain_s"] else "- | -"
        check = f"{r['files']:.0f} | {r['corr']:.3f} ({r['truth']:.3f})" if "files" in r else "- | -"
        lines.append(
            f"| {' x '.join(map(str, r['shape']))} | {r['scheduler']} | {r['mpx']:.1f} | {r['runs']} | "
            f"{r['pipeline_s']:.1f} | {r['mpx_per_s']:.2f} | {r['process_s']:.1f} | {r['process_mpx_per_s']:.2f} | "
            f"{r['mpx_per_s'] / rows[0]['mpx_per_s']:.2f} | "
            f"{r['peak_mib']:.0f} | {chain} | {check} |"
        )
    evaluate.print_and_save("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
