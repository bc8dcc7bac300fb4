"""The GPU path, measured: one command for a machine with a CUDA GPU (under 8 minutes on one H200).

    python benchmarks/gpu.py [--sizes 448:100,2048:100] [--compare 8x448] [--out benchmarks/results/gpu.md]
    python benchmarks/gpu.py --device cpu --sizes 128:6 --compare 4x96   # the script itself, on a CPU

For each SIZE:SECTIONS it builds a procedural misaligned stack (Zarr), then in this process runs the
prealignment on the CPU, times the estimate stage on the device (MPx/s of input, peak GPU memory), and times
`emalign align --device DEVICE` end to end in a fresh process (MPx/s, seconds per stage). ``--compare ZxS``
aligns a short stack on the CPU and on the device and reports the RMS difference of their fields (px) and the
share of output pixels within 1 grey level (the CUDA path runs the network in bfloat16 autocast). Writes a
Markdown table with the device name and the torch / CUDA versions.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from emalign import evaluate
from emalign.device import resolve_device
from emalign.io import open_stack
from emalign.pipeline import AlignParams, Workspace, run_stage
from emalign.synth import demo_stack

RESULTS = Path(__file__).parent / "results"
LOCAL = {"compute": {"scheduler": "threads", "num_workers": 1}, "progress": False}


def make_input(path: Path, sections: int, size: int) -> Path:
    """A misaligned procedural stack as Zarr (one chunk per section)."""
    stack = demo_stack((sections, size, size), seed=0)[1].stack
    array = zarr.open_array(str(path), mode="w", shape=stack.shape, chunks=(1, size, size), dtype=stack.dtype)
    array[:] = stack
    return path


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_rate(src: Path, out: Path, device: torch.device) -> tuple[float, float]:
    """MPx/s of the estimate stage on ``device`` (prealigned on the CPU first) and its peak GPU memory (GiB)."""
    ws = Workspace.create(open_stack(src), out, AlignParams(polish="off"), overwrite=True)
    run_stage("prealign", ws, device="cpu", **LOCAL)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronise(device)
    start = time.perf_counter()
    run_stage("estimate", ws, device=str(device), **LOCAL)
    _synchronise(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return float(np.prod(ws.writer.shape)) / 1e6 / seconds, peak


def end_to_end(src: Path, out: Path, device: torch.device) -> tuple[float, str]:
    """MPx/s of `emalign align --device` in a fresh process, and its per-stage time line."""
    command = [sys.executable, "-m", "emalign.cli", "align", str(src), str(out), "--overwrite", "--quiet"]
    done = subprocess.run([*command, "--device", str(device)], capture_output=True, text=True, check=True)
    line = re.search(r"^time: .*$", done.stdout, re.MULTILINE)
    if line is None:
        raise RuntimeError(f"emalign align printed no time line:\n{done.stdout}")
    rate = re.search(r"([0-9.]+) MPx/s", line.group(0))
    return float(rate.group(1)) if rate else float("nan"), line.group(0)


def compare(src: Path, tmp: Path, device: torch.device) -> tuple[float, float]:
    """RMS difference (px) of the global fields aligned on the CPU and on ``device``, and the share of output pixels
    within 1 grey level."""
    results = []
    for name in ("cpu", str(device)):
        out = tmp / f"compare-{name}.zarr"
        ws = Workspace.create(open_stack(src), out, AlignParams(), overwrite=True)
        for stage in ("prealign", "estimate", "stitch", "refine", "polish", "render"):
            run_stage(stage, ws, device=name, **LOCAL)
        fields = np.asarray(ws.array("fields/global")[:]) * ws.factor
        results.append((fields, np.asarray(open_stack(out).data).astype(np.int32)))
    (cpu_fields, cpu_out), (dev_fields, dev_out) = results
    rms = float(np.sqrt(np.mean(np.sum((cpu_fields - dev_fields) ** 2, axis=1))))
    return rms, float(np.mean(np.abs(cpu_out - dev_out) <= 1))


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [(int(size), int(sections)) for size, sections in (item.split(":") for item in text.split(",") if item)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    parser.add_argument("--sizes", default="448:100,2048:100", help="SIZE:SECTIONS,... stacks to time")
    parser.add_argument("--compare", default="8x448", help="ZxSIZE stack aligned on the CPU and on the device")
    parser.add_argument("--out", default=str(RESULTS / "gpu.md"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"emalign on {name}; torch {torch.__version__}, CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d')}",
        "",
        "| stack (z, y, x) | estimate MPx/s | peak GPU GiB (estimate) | end to end MPx/s | stages |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for size, sections in _parse_sizes(args.sizes):
            src = make_input(tmp / f"in-{size}.zarr", sections, size)
            rate, peak = estimate_rate(src, tmp / "estimate.zarr", device)
            total, stages = end_to_end(src, tmp / "align.zarr", device)
            lines.append(f"| {sections} x {size} x {size} | {rate:.1f} | {peak:.2f} | {total:.2f} | `{stages}` |")
            print(lines[-1], flush=True)
        depth, size = (int(v) for v in args.compare.split("x"))
        rms, within = compare(make_input(tmp / "compare.zarr", depth, size), tmp, device)
    lines += [
        "",
        f"CPU vs {name} on {depth} x {size} x {size}: global fields differ by {rms:.3f} px RMS; "
        f"{100 * within:.2f} % of output pixels within 1 grey level.",
    ]
    evaluate.print_and_save("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
