"""Running the stages: :func:`run_stage` runs one as the stage table (:data:`emalign.pipeline.stages.TABLE`)
declares it, :func:`align` all of them on a stack on disk, :func:`align_in_memory` those that make the fields on
a short stack held in memory, in a temporary folder (the in-memory API
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
from emalign.device import release_freed_memory, resolve_device, reuse_freed_memory, task_device
from emalign.fields import resample, warp
from emalign.io import Stack, cast_to_dtype, create_array, open_stack
from emalign.models.faemreg import FAEMReg
from emalign.pipeline import stages
from emalign.pipeline.adapt import adapt_model
from emalign.pipeline.estimate import solve_prealignment
from emalign.pipeline.plan import AlignParams, parse_z_range
from emalign.pipeline.polish import polish_wanted, solve_polish
from emalign.pipeline.qc import run_qc
from emalign.pipeline.refine import FINE_MIN_PEAK, adjacent_peak, solve_refinement
from emalign.pipeline.stages import (
    BLOCK,
    BLOCK_TILE,
    BLOCK_UNITS,
    ONE,
    SECTION,
    TABLE,
    TILE,
    Stage,
)
from emalign.pipeline.store import Workspace

__all__ = ["align", "align_in_memory", "full_resolution_fields", "run_stage"]


def start_report(stack: Stack, ws: Workspace) -> str:
    """What a run says as it starts: how the input's sections were gathered (when not plainly), and the resolution
    it aligns at."""
    return "\n".join(filter(None, (stack.layout, ws.resolution.describe())))


def _finished(ws: Workspace, stage: str, index: int) -> bool:
    """Task ``index`` already has its completion marker (a retried task, or one rerun for a lost worker)."""
    return bool(ws.array(f"stages/{stage}")[index])


def _task(out: str, stage: str, index: int, tile: int, device: str, threads: int, progress: bool) -> None:
    """One task of ``stage`` (:data:`emalign.pipeline.stages.TABLE`): z-block ``index`` and/or xy task tile
    ``tile`` as its unit says, z-block tasks on ``threads`` CPU threads; a task with its marker is not redone."""
    spec = stages.stage(stage)
    device = task_device(device)
    if spec.unit in BLOCK_UNITS:
        reuse_freed_memory()
        torch.set_num_threads(threads)
    try:
        _run_task(Workspace(out), spec, index, tile, device, progress)
    finally:
        release_freed_memory()


def _run_task(ws: Workspace, spec: Stage, index: int, tile: int, device: str, progress: bool) -> None:
    """:func:`_task` once its device and threads are set."""
    marker = {BLOCK: index, BLOCK_TILE: ws.plan.task_index(index, tile), TILE: tile, ONE: 0}[spec.unit]
    if spec.markers != SECTION and _finished(ws, spec.name, marker):
        return
    task = stages.function(spec.task)
    if spec.unit == TILE:
        task(ws, tile)
        return
    stack = ws.input_stack() if spec.reads == "input" else ws.working_stack()
    if spec.unit == BLOCK:
        task(ws, stack, index, device=device)
    elif spec.unit == BLOCK_TILE:
        task(ws, stack, index, tile, device=device)
    else:
        task(ws, stack, device, progress)


def adapt_task(ws: Workspace, stack: Stack, device: str, progress: bool) -> None:
    """The adapt stage's task: fine-tune the model on a sample of ``stack`` aligned in memory."""
    adapt_model(ws, stack, align_in_memory, device, progress)


def _polish_reason(ws: Workspace) -> str:
    """Why the stack is polished or not, in a few words."""
    if ws.params.polish != "auto":
        return f"--polish {ws.params.polish}"
    return f"auto: adjacent sections' median peak {adjacent_peak(ws):.2f}, polished from {FINE_MIN_PEAK}"


def polish_gate(ws: Workspace) -> str | None:
    """The polish stage's gate: a stack that is not polished keeps its refined fields as the global ones."""
    if polish_wanted(ws):
        return None
    if not ws.stage_done("polish")[-1]:
        solve_polish(ws, polished=False)
    return f"polish: off ({_polish_reason(ws)}); refined fields kept"


def finish_prealign(ws: Workspace, blocks: int) -> str:
    flagged = int((solve_prealignment(ws) != 0).sum())
    return f"prealign: {blocks} block(s) done; global rigid solve done; {flagged} flagged section(s)"


def finish_adapt(ws: Workspace, blocks: int) -> str:
    return f"adapt: {ws.params.adapt} steps on this stack; model {ws.model}"


def finish_stitch(ws: Workspace, blocks: int) -> str:
    return "stitch: stitched fields written"


def finish_refine(ws: Workspace, blocks: int) -> str:
    if not ws.stage_done("refine")[-1]:
        solve_refinement(ws)
    return f"refine: {blocks} block(s) done; translation solve done, refined fields written"


def finish_polish(ws: Workspace, blocks: int) -> str:
    if not ws.stage_done("polish")[-1]:
        solve_polish(ws, polished=True)
    return f"polish: {blocks} block(s) done ({_polish_reason(ws)}); node solve done, global fields written"


def finish_render(ws: Workspace, blocks: int) -> str:
    ws.writer.mark_complete()
    return f"render: {blocks} block(s) written; output complete"


def finish_qc(ws: Workspace, blocks: int) -> str:
    return run_qc(ws, ws.input_stack())


def _todo(ws: Workspace, spec: Stage, z_range: tuple[int, int] | None) -> list[tuple[int, int]]:
    """``(block, tile)`` tasks of ``spec`` without their completion marker, the z-blocks' only in ``z_range``
    (block 0 for a stage of xy tiles, tile 0 for a stage of z-blocks)."""
    n_tiles = len(ws.plan.tiles())
    if spec.unit not in BLOCK_UNITS:
        count = spec.tasks(0, n_tiles)
        done = ws.stage_done(spec.name)[:count] if count else []
        return [(0, i) if spec.unit == TILE else (i, 0) for i in range(count) if not done[i]]
    blocks = ws.plan.blocks()
    wanted = set(ws.plan.blocks(z_range))
    if spec.markers == SECTION:
        done = ws.writer.done_sections()
        return [(i, 0) for i, (a, b) in enumerate(blocks) if (a, b) in wanted and not done[a:b].all()]
    tiles = n_tiles if spec.unit == BLOCK_TILE else 1
    done = ws.stage_done(spec.name)[: len(blocks) * tiles].reshape(len(blocks), tiles)  # block-major: task_index
    return [(i, t) for i, block in enumerate(blocks) if block in wanted for t in range(tiles) if not done[i, t]]


def _all_done(ws: Workspace, spec: Stage) -> bool:
    """Every task of ``spec`` has its completion marker (the global step's own marker aside)."""
    if spec.markers == SECTION:
        return bool(ws.writer.done_sections().all())
    if not spec.unit:
        return True
    return bool(ws.stage_done(spec.name)[: spec.tasks(len(ws.plan.blocks()), len(ws.plan.tiles()))].all())


def run_stage(
    stage: str,
    ws: Workspace,
    z_range: str | None = None,
    compute: dict | None = None,
    device: str = "auto",
    progress: bool = True,
) -> str:
    """Run one stage of :data:`STAGES` on a z-range of the stack, as :data:`emalign.pipeline.stages.TABLE` declares it:
    check what it requires, run its unfinished tasks, then its global step once every task is done.

    ``compute``: the dask compute arguments from :func:`emalign.cluster.scheduler` (default:
    the threaded scheduler). Returns a one-line (for qc, a few-line) report.
    """
    spec = stages.stage(stage)
    zr = parse_z_range(z_range, ws.plan.shape[0])
    reuse_freed_memory()  # before the scheduler starts its threads
    compute = compute or {"scheduler": "threads", "num_workers": cores()}
    path = stores.absolute(ws.path)  # tasks may run on other machines, in another working directory
    if not spec.is_on(ws.params):
        return f"{stage}: off (--{spec.switch} 0)"
    ws.check_requirements(stage)
    if spec.gate and (report := stages.function(spec.gate)(ws)) is not None:
        return report
    todo = _todo(ws, spec, zr) if spec.unit else []
    threads = compute.get("threads_per_task") or max(1, cores() // (compute.get("num_workers") or 1))
    tasks = [dask.delayed(_task)(path, stage, i, tile, device, threads, progress) for i, tile in todo]
    blocks = len({i for i, _ in todo})
    n_tiles = len(ws.plan.tiles())
    if spec.unit in BLOCK_UNITS:
        run_tasks(tasks, compute, stage, progress and bool(todo))
    else:
        label = f"{stage} ({len(tasks)} xy tiles)" if spec.unit == TILE else stage
        run_tasks(tasks, compute, label, progress and spec.tasks(0, n_tiles) > 1)
    if spec.solve and _all_done(ws, spec):
        return stages.function(spec.solve)(ws, blocks)
    tiled = f" in {n_tiles} xy tiles" if spec.unit == BLOCK_TILE and n_tiles > 1 else ""
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
        print(start_report(stack, ws))
    seconds: dict[str, float] = {}
    with scheduler(scheduler_spec, jobqueue_options) as compute:
        for stage in (spec.name for spec in TABLE if spec.is_on(params)):
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
        names = [spec.name for spec in TABLE if spec.in_memory and spec.is_on(params)]
        for done, stage in enumerate(names, start=1):
            if network is not None and stage in ("estimate", "stitch"):
                if stage == "estimate":
                    network(ws)
            else:
                run_stage(stage, ws, device=device, progress=progress)
            if report is not None:
                report(done, len(names))
        fields = full_resolution_fields(ws)
    aligned = np.stack(
        [cast_to_dtype(warp(stack[z].astype(np.float32), fields[z]), stack.dtype) for z in range(len(stack))]
    )
    return aligned, fields
