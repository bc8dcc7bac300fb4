"""The streaming alignment pipeline: prealign -> (adapt) -> estimate -> stitch -> refine -> polish -> render -> qc.

Each stage works on z-blocks as independent dask tasks that read their input from the
stack and the output folder and write their results straight to Zarr (nothing large is
gathered), records finished blocks, and skips them when run again: a killed run resumes
where it stopped. :func:`align` runs them all on a stack on disk; :func:`align_in_memory`
runs them on a short stack held in memory, in a temporary folder (the in-memory API
:func:`emalign.register.register_sections` and the adapt stage's sample use it).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import dask
import numpy as np
import torch

from emalign import models, stores
from emalign.cluster import check_scheduler, cores, run_tasks, scheduler
from emalign.device import resolve_device, reuse_freed_memory
from emalign.errors import EmalignError
from emalign.fields import resample, warp
from emalign.io import cast_to_dtype, create_array, open_stack
from emalign.models.faemreg import FAEMReg
from emalign.pipeline.adapt import adapt_model
from emalign.pipeline.estimate import estimate_block, prealign_block, solve_prealignment
from emalign.pipeline.plan import AlignParams, Plan, parse_z_range
from emalign.pipeline.polish import polish_block, polish_wanted, solve_polish
from emalign.pipeline.qc import run_qc
from emalign.pipeline.refine import FINE_MIN_PEAK, adjacent_peak, refine_block, solve_refinement
from emalign.pipeline.render import render_block
from emalign.pipeline.stitch import stitch
from emalign.pipeline.store import Workspace, open_workspace

__all__ = [
    "IN_MEMORY_STAGES",
    "STAGES",
    "AlignParams",
    "Plan",
    "Workspace",
    "align",
    "align_in_memory",
    "full_resolution_fields",
    "open_workspace",
    "run_stage",
]


def _finished(ws: Workspace, stage: str, index: int) -> bool:
    """Task ``index`` already has its completion marker (a retried task, or one rerun for a lost worker)."""
    return bool(ws.array(f"stages/{stage}")[index])


def _block_task(out: str, stage: str, index: int, device: str, threads: int, tile: int = 0) -> None:
    """Block ``index`` of ``prealign``, ``estimate`` (its xy task tile ``tile``), ``refine``, ``polish`` or
    ``render`` on ``threads`` CPU threads; a task with its completion marker is not redone."""
    reuse_freed_memory()
    torch.set_num_threads(threads)
    ws = Workspace(out)
    if stage == "render":
        render_block(ws, ws.input_stack(), index)
    elif stage == "estimate":
        if not _finished(ws, stage, ws.plan.task_index(index, tile)):
            estimate_block(ws, ws.working_stack(), index, tile, device=device)
    elif not _finished(ws, stage, index):
        if stage == "prealign":
            prealign_block(ws, ws.working_stack(), index)
        elif stage == "refine":
            refine_block(ws, ws.working_stack(), index)
        else:
            polish_block(ws, ws.working_stack(), index)


def _adapt_task(out: str, device: str, progress: bool) -> None:
    ws = Workspace(out)
    if not _finished(ws, "adapt", 0):
        adapt_model(ws, ws.working_stack(), align_in_memory, device, progress)


def _stitch_task(out: str, tile: int = 0) -> None:
    ws = Workspace(out)
    if not _finished(ws, "stitch", tile):
        stitch(ws, tile)


def _polish_reason(ws: Workspace) -> str:
    """Why the stack is polished or not, in a few words."""
    if ws.params.polish != "auto":
        return f"--polish {ws.params.polish}"
    return f"auto: adjacent sections' median peak {adjacent_peak(ws):.2f}, polished from {FINE_MIN_PEAK}"


def _blocks_todo(ws: Workspace, stage: str, z_range: tuple[int, int] | None) -> list[tuple[int, int]]:
    """``(block, tile)`` tasks of ``stage`` in ``z_range`` without their completion marker (tile: the xy task tile
    of an estimate task, 0 for the other stages)."""
    blocks = ws.plan.blocks()
    wanted = set(ws.plan.blocks(z_range))
    if stage == "render":
        done = ws.writer.done_sections()
        return [(i, 0) for i, (a, b) in enumerate(blocks) if (a, b) in wanted and not done[a:b].all()]
    tiles = len(ws.plan.tiles()) if stage == "estimate" else 1
    done = ws.stage_done(stage)[: len(blocks) * tiles].reshape(len(blocks), tiles)  # block-major: Plan.task_index
    return [(i, t) for i, block in enumerate(blocks) if block in wanted for t in range(tiles) if not done[i, t]]


STAGES = ("prealign", "adapt", "estimate", "stitch", "refine", "polish", "render", "qc")
IN_MEMORY_STAGES = STAGES[: STAGES.index("render")]
"""What :func:`align_in_memory` runs: the fields, not the written pyramid or the QC."""


def run_stage(
    stage: str,
    ws: Workspace,
    z_range: str | None = None,
    compute: dict | None = None,
    device: str = "auto",
    progress: bool = True,
) -> str:
    """Run one stage (``prealign``, ``adapt``, ``estimate``, ``stitch``, ``refine``, ``polish``, ``render``,
    ``qc``) on a z-range of the stack.

    ``compute``: the dask compute arguments from :func:`emalign.cluster.scheduler` (default:
    the threaded scheduler). Returns a one-line (for qc, a few-line) report.
    """
    if stage not in STAGES:
        raise EmalignError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    zr = parse_z_range(z_range, ws.plan.shape[0])
    reuse_freed_memory()  # before the scheduler starts its threads
    compute = compute or {"scheduler": "threads", "num_workers": cores()}
    path = stores.absolute(ws.path)  # tasks may run on other machines, in another working directory
    if stage == "stitch":
        if not (done := ws.stage_done("stitch")).all():
            ws.require("estimate")
            tasks = [dask.delayed(_stitch_task)(path, tile) for tile in np.flatnonzero(~done).tolist()]
            run_tasks(tasks, compute, f"stitch ({len(tasks)} xy tiles)", progress and len(done) > 1)
        return "stitch: stitched fields written"
    if stage == "qc":
        return run_qc(ws, ws.input_stack())
    if stage == "adapt":
        if not ws.params.adapt:
            return "adapt: off (--adapt 0)"
        if not ws.stage_done("adapt").all():
            ws.require("prealign")
            run_tasks([dask.delayed(_adapt_task)(path, device, progress)], compute, "adapt", progress=False)
        return f"adapt: {ws.params.adapt} steps on this stack; model {ws.model}"
    if stage == "estimate":
        ws.require("prealign")
        if ws.params.adapt:
            ws.require("adapt")
    if stage == "refine":
        ws.require("stitch")
    if stage == "polish":
        ws.require("refine")
        if not polish_wanted(ws):
            if not ws.stage_done("polish")[-1]:
                solve_polish(ws, polished=False)
            return f"polish: off ({_polish_reason(ws)}); refined fields kept"
    if stage == "render":
        ws.require("polish")
    todo = _blocks_todo(ws, stage, zr)
    threads = compute.get("threads_per_task") or max(1, cores() // (compute.get("num_workers") or 1))
    tasks = [dask.delayed(_block_task)(path, stage, i, device, threads, tile) for i, tile in todo]
    blocks = len({i for i, _ in todo})
    tiled = f" in {len(ws.plan.tiles())} xy tiles" if stage == "estimate" and len(ws.plan.tiles()) > 1 else ""
    run_tasks(tasks, compute, stage, progress and bool(todo))
    if stage == "prealign" and ws.stage_done("prealign").all():
        flagged = int((solve_prealignment(ws) != 0).sum())
        return f"prealign: {blocks} block(s) done; global rigid solve done; {flagged} flagged section(s)"
    if stage == "refine" and (refined := ws.stage_done("refine"))[:-1].all():
        if not refined[-1]:
            solve_refinement(ws)
        return f"refine: {blocks} block(s) done; translation solve done, refined fields written"
    if stage == "polish" and (polished := ws.stage_done("polish"))[:-1].all():
        if not polished[-1]:
            solve_polish(ws, polished=True)
        return f"polish: {blocks} block(s) done ({_polish_reason(ws)}); node solve done, global fields written"
    if stage == "render" and ws.writer.done_sections().all():
        ws.writer.mark_complete()
        return f"render: {blocks} block(s) written; output complete"
    return f"{stage}: {blocks} block(s) done{tiled}"


def align(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    params: AlignParams | None = None,
    scheduler_spec: str = "threads",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    jobqueue_options: dict | None = None,
) -> tuple[Workspace, dict[str, float], str]:
    """Align a stack end to end into an OME-Zarr; returns the workspace, seconds per stage and the QC summary.

    ``jobqueue_options``: SLURM job settings for ``scheduler_spec="slurm"`` (:func:`emalign.cluster.slurm_options`).
    """
    params = params or AlignParams()
    check_scheduler(scheduler_spec)
    resolve_device(device)
    stack = open_stack(input_path, level=params.level)
    ws = Workspace.create(stack, output_path, params, overwrite=overwrite)
    if progress:
        print(ws.resolution.describe())
    seconds: dict[str, float] = {}
    with scheduler(scheduler_spec, jobqueue_options) as compute:
        for stage in STAGES:
            if stage == "adapt" and not params.adapt:
                continue
            start = time.perf_counter()
            message = run_stage(stage, ws, None, compute, device, progress)
            seconds[stage] = time.perf_counter() - start
            if progress and stage != "qc":
                print(message)
    return ws, seconds, message


def full_resolution_fields(ws: Workspace, name: str = "fields/global") -> np.ndarray:
    """``(Z, 2, Y, X)`` float32: the workspace's field grids ``name`` resampled to every pixel of the input."""
    grid, factor, shape = ws.array(name), ws.factor, ws.writer.shape[1:]
    stride = factor * ws.params.stride
    return np.stack([resample(factor * np.asarray(grid[z]), stride, 1, shape) for z in range(ws.plan.shape[0])])


def align_in_memory(
    stack: np.ndarray,
    model: str | FAEMReg = models.DEFAULT_MODEL,
    params: AlignParams | None = None,
    device: str = "auto",
    progress: bool = False,
    report: Callable[[int, int], None] | None = None,
    network: Callable[[Workspace], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run :data:`IN_MEMORY_STAGES` on a checked ``(Z, Y, X)`` stack in a temporary folder.

    ``model`` (a name, a checkpoint or a loaded network) replaces ``params.model``; ``report(done, total)``
    is called after each stage; ``network(ws)``, when given, runs in place of the estimate and stitch
    stages (it writes ``fields/stitched`` and marks both done). Returns the aligned stack (the input's
    dtype) and its ``(Z, 2, Y, X)`` float32 full-resolution pull fields.
    """
    net = model if isinstance(model, FAEMReg) else models.load(model)
    with tempfile.TemporaryDirectory(prefix="emalign-register-") as tmp:
        checkpoint = Path(tmp) / "model.pt"
        models.save_checkpoint(checkpoint, net)
        params = replace(params or AlignParams(), model=str(checkpoint))
        source = create_array(Path(tmp) / "input.zarr", "stack", stack.shape, (1, *stack.shape[1:]), stack.dtype)
        source[:] = stack
        ws = Workspace.create(open_stack(Path(tmp) / "input.zarr" / "stack"), Path(tmp) / "aligned.zarr", params)
        stages = [stage for stage in IN_MEMORY_STAGES if stage != "adapt" or params.adapt]
        for done, stage in enumerate(stages, start=1):
            if network is not None and stage in ("estimate", "stitch"):
                if stage == "estimate":
                    network(ws)
            else:
                run_stage(stage, ws, device=device, progress=progress)
            if report is not None:
                report(done, len(stages))
        fields = full_resolution_fields(ws)
    aligned = np.stack(
        [cast_to_dtype(warp(stack[z].astype(np.float32), fields[z]), stack.dtype) for z in range(len(stack))]
    )
    return aligned, fields
