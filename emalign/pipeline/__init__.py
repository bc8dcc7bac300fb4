"""The streaming alignment pipeline: prealign -> estimate -> stitch -> render -> qc.

Each stage works on z-blocks as independent dask tasks that read their input from the
stack and the output folder and write their results straight to Zarr (nothing large is
gathered), records finished blocks, and skips them when run again: a killed run resumes
where it stopped. :func:`align` runs them all.
"""

from __future__ import annotations

import os
import time

import dask

from emalign.cluster import run_tasks, scheduler
from emalign.errors import EmalignError
from emalign.io import Stack, open_stack
from emalign.pipeline.estimate import estimate_block, prealign_block, solve_prealignment
from emalign.pipeline.plan import AlignParams, Plan, parse_z_range
from emalign.pipeline.qc import run_qc
from emalign.pipeline.render import render_block
from emalign.pipeline.stitch import stitch
from emalign.pipeline.store import Workspace, open_workspace

__all__ = ["AlignParams", "Plan", "Workspace", "align", "open_workspace", "run_stage"]


def _stack(ws: Workspace) -> Stack:
    return open_stack(ws.input_path, level=ws.params.level)


def _prealign_task(out: str, index: int) -> None:
    ws = Workspace(out)
    prealign_block(ws, _stack(ws), index)


def _estimate_task(out: str, index: int, device: str, threads: int) -> None:
    ws = Workspace(out)
    estimate_block(ws, _stack(ws), index, device=device, threads=threads)


def _render_task(out: str, index: int) -> None:
    ws = Workspace(out)
    render_block(ws, _stack(ws), index)


def _blocks_todo(ws: Workspace, stage: str, z_range: tuple[int, int] | None) -> list[int]:
    blocks = ws.plan.blocks()
    wanted = set(ws.plan.blocks(z_range))
    if stage == "render":
        done = ws.writer.done_sections()
        return [i for i, (a, b) in enumerate(blocks) if (a, b) in wanted and not done[a:b].all()]
    done = ws.stage_done(stage)
    return [i for i, block in enumerate(blocks) if block in wanted and not done[i]]


def run_stage(
    stage: str,
    ws: Workspace,
    z_range: str | None = None,
    scheduler_spec: str = "threads",
    device: str = "auto",
    progress: bool = True,
) -> str:
    """Run one stage (``prealign``, ``estimate``, ``stitch``, ``render``, ``qc``) on a z-range of the stack.

    Returns a one-line (or, for qc, a few-line) report.
    """
    depth = ws.plan.shape[0]
    zr = parse_z_range(z_range, depth)
    if stage == "stitch":
        if not ws.stage_done("stitch").all():
            stitch(ws)
        return "stitch: global fields written"
    if stage == "qc":
        return run_qc(ws, _stack(ws))
    todo = _blocks_todo(ws, stage, zr)
    with scheduler(scheduler_spec) as compute:
        workers = compute.get("num_workers") or 1
        threads = max(1, (os.cpu_count() or 1) // workers)
        if stage == "prealign":
            tasks = [dask.delayed(_prealign_task)(ws.path, i) for i in todo]
        elif stage == "estimate":
            ws.require("prealign")
            tasks = [dask.delayed(_estimate_task)(ws.path, i, device, threads) for i in todo]
        elif stage == "render":
            ws.require("stitch")
            tasks = [dask.delayed(_render_task)(ws.path, i) for i in todo]
        else:
            raise EmalignError(f"unknown stage {stage!r}")
        run_tasks(tasks, compute, f"{stage} ({len(todo)} blocks)", progress and bool(todo))
    if stage == "prealign" and ws.stage_done("prealign").all():
        flags = solve_prealignment(ws)
        return f"prealign: {len(todo)} block(s) done; global rigid solve done; {int((flags != 0).sum())} flagged section(s)"
    if stage == "render" and ws.writer.done_sections().all():
        ws.writer.mark_complete()
        return f"render: {len(todo)} block(s) written; output complete"
    return f"{stage}: {len(todo)} block(s) done"


def align(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    params: AlignParams | None = None,
    scheduler_spec: str = "threads",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Workspace, dict[str, float], str]:
    """Align a stack end to end into an OME-Zarr; returns the workspace, seconds per stage and the QC summary."""
    params = params or AlignParams()
    stack = open_stack(input_path, level=params.level)
    ws = Workspace.create(stack, output_path, params, overwrite=overwrite)
    seconds: dict[str, float] = {}
    for stage in ("prealign", "estimate", "stitch", "render"):
        start = time.perf_counter()
        message = run_stage(stage, ws, None, scheduler_spec, device, progress)
        seconds[stage] = time.perf_counter() - start
        if progress:
            print(message)
    start = time.perf_counter()
    report = run_stage("qc", ws)
    seconds["qc"] = time.perf_counter() - start
    return ws, seconds, report
