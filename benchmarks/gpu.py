"""The GPU path, measured: one command for a machine with a CUDA GPU (under 8 minutes on one H100 / H200).

    python benchmarks/gpu.py [--sizes 448:100,2048:100] [--compare 8x448] [--out benchmarks/results/gpu.md]
    python benchmarks/gpu.py --device cpu --sizes 128:6 --compare 4x96   # the script itself, on a CPU

``--compare ZxS`` first aligns a short stack on the CPU and on the device and reports the RMS difference of their
global fields (px) and the share of output pixels within 1 grey level (the device runs the network in bfloat16
autocast); it also warms the device up. ``--accuracy ZxS:N`` then scores both against the known truth of N
misalignments of a procedural stack (the accuracy table: float32 on the CPU, bfloat16 on the device). Meanwhile
it builds for each SIZE:SECTIONS a procedural misaligned stack (Zarr; sections over 1024 px mirror-tiled from a
1024 px texture, misaligned in parallel); once all are made, it aligns each end to end with
:func:`emalign.pipeline.align` on the device, all stages, the local scheduler on every core: MPx/s of the estimate
stage and end to end, each stage's seconds (the bottleneck is the largest), and the peak GPU memory. Writes a
Markdown file with the device name and the torch / CUDA versions, after each part (a run cut short keeps what it
measured).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from emalign import evaluate
from emalign.cluster import cores
from emalign.device import describe, device_name, resolve_device
from emalign.io import open_stack
from emalign.pipeline import AlignParams, Workspace, align, run_stage
from emalign.synth import em_texture, misalign

RESULTS = Path(__file__).parent / "results"
TEXTURE_SIDE = 1024
"""Sections larger than this are mirror-tiled from a texture of this side (the texture costs its area in time)."""
SECTIONS_PER_JOB = 8


def _misaligned(chunk: np.ndarray, seed: int) -> np.ndarray:
    return misalign(chunk, seed=seed).stack


def make_input(path: Path, sections: int, size: int) -> Path:
    """A misaligned procedural stack ``(sections, size, size)`` uint8 as Zarr (one chunk per section)."""
    side = min(size, TEXTURE_SIDE)
    aligned = em_texture((sections, side, side), seed=0, z_step=4.0, workers=cores())
    aligned = np.pad(aligned, ((0, 0), (0, size - side), (0, size - side)), mode="symmetric")
    array = zarr.open_array(str(path), mode="w", shape=aligned.shape, chunks=(1, size, size), dtype=aligned.dtype)
    starts = range(0, sections, SECTIONS_PER_JOB)
    with ProcessPoolExecutor(min(len(starts), cores())) as pool:
        jobs = [pool.submit(_misaligned, aligned[z : z + SECTIONS_PER_JOB], z) for z in starts]
        for z, job in zip(starts, jobs, strict=True):
            array[z : z + SECTIONS_PER_JOB] = job.result()
    return path


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_align(src: Path, out: Path, device: torch.device) -> tuple[dict[str, float], float]:
    """Seconds of each stage of ``emalign align`` on ``device`` (all cores) and its peak GPU memory (GiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronise(device)
    seconds = align(src, out, device=str(device), overwrite=True, progress=False)[1]
    _synchronise(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def compare(src: Path, tmp: Path, device: torch.device) -> tuple[float, float]:
    """RMS difference (px) of the global fields aligned on the CPU and on ``device``, and the share of output pixels
    within 1 grey level."""
    results = []
    for name in ("cpu", str(device)):
        out = tmp / f"compare-{name}.zarr"
        ws = Workspace.create(open_stack(src), out, AlignParams(), overwrite=True)
        for stage in ("prealign", "estimate", "stitch", "refine", "polish", "render"):
            run_stage(stage, ws, device=name, progress=False)
        fields = np.asarray(ws.array("fields/global")[:]) * ws.factor
        results.append((fields, np.asarray(open_stack(out).data).astype(np.int32)))
    (cpu_fields, cpu_out), (dev_fields, dev_out) = results
    rms = float(np.sqrt(np.mean(np.sum((cpu_fields - dev_fields) ** 2, axis=1))))
    return rms, float(np.mean(np.abs(cpu_out - dev_out) <= 1))


def accuracy(shape: tuple[int, int, int], seeds: int, tmp: Path, device: torch.device) -> str:
    """:func:`emalign.evaluate.evaluate`'s table of the pipeline on the CPU (float32) and on ``device`` (bfloat16
    network) over ``seeds`` misalignments of one procedural stack (mean and range of the seeds)."""
    aligned = em_texture(shape, seed=0, z_step=4.0, workers=cores())
    aligners = {
        f"emalign align --device {name}": evaluate.pipeline_aligner(tmp / f"accuracy-{name}", device=name)
        for name in ("cpu", str(device))
    }
    runs = [evaluate.evaluate(aligned, aligners, seed=seed) for seed in range(seeds)]
    lines = ["| method | rms px | adj px | drift px |", "|---|---|---|---|"]
    lines += [f"| {name} | {' | '.join(cells)} |" for name, cells in evaluate.seed_cells(runs).items()]
    return "\n".join(lines)


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [(int(size), int(sections)) for size, sections in (item.split(":") for item in text.split(",") if item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    parser.add_argument("--sizes", default="448:100,2048:100", help="SIZE:SECTIONS,... stacks to time")
    parser.add_argument("--compare", default="8x448", help="ZxSIZE stack aligned on the CPU and on the device")
    parser.add_argument("--accuracy", default="24x448:2", help="ZxSIZE:SEEDS known-truth stacks, CPU vs device")
    parser.add_argument("--out", default=str(RESULTS / "gpu.md"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = device_name(device)
    lines = [f"emalign on {describe(device)}; {time.strftime('%Y-%m-%d')}", ""]
    # the timed stacks are made while the comparisons run (in a fresh process: no fork of this threaded one), and
    # all of them before any timing starts
    maker = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with tempfile.TemporaryDirectory() as tmp_name, maker:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        timed_inputs = [
            (maker.submit(make_input, tmp / f"in-{size}.zarr", sections, size), sections, size)
            for size, sections in _parse_sizes(args.sizes)
        ]
        depth, side = (int(v) for v in args.compare.split("x"))
        rms, within = compare(make_input(tmp / "compare.zarr", depth, side), tmp, device)
        lines += [
            f"CPU vs {name} on {depth} x {side} x {side}: global fields differ by {rms:.3f} px RMS; "
            f"{100 * within:.2f} % of output pixels within 1 grey level.",
            "",
        ]
        evaluate.print_and_save("\n".join(lines), args.out)  # each part saved as it ends: a cut run keeps it
        stack, seeds = args.accuracy.split(":")
        depth, side = (int(v) for v in stack.split("x"))
        lines += [
            f"Accuracy against the known truth, {stack} procedural stack, {seeds} misalignments (mean (range)):",
            "",
            accuracy((depth, side, side), int(seeds), tmp, device),
            "",
            "| stack (z, y, x) | estimate MPx/s | end to end MPx/s | peak GPU GiB | seconds per stage |",
            "|---|---|---|---|---|",
        ]
        evaluate.print_and_save("\n".join(lines), args.out)
        ready = [(made.result(), sections, size) for made, sections, size in timed_inputs]
        print(f"timed inputs ready {time.perf_counter() - started:.0f} s after the start", flush=True)
        for src, sections, size in ready:
            seconds, peak = timed_align(src, tmp / "align.zarr", device)
            mpx = sections * size * size / 1e6
            stages = ", ".join(f"{stage} {s:.1f}" for stage, s in seconds.items())
            lines.append(
                f"| {sections} x {size} x {size} | {mpx / seconds['estimate']:.1f} | "
                f"{mpx / sum(seconds.values()):.2f} | {peak:.2f} | {stages} |"
            )
            evaluate.print_and_save("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
