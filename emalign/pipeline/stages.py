"""The pipeline's stages, declared once: what each needs, what its tasks are, what marks them done.

Everything that knows the stages reads :data:`TABLE`: the runner (:func:`emalign.pipeline.run.run_stage`), the
output's marker arrays (:mod:`emalign.pipeline.store`), the ``emalign`` stage commands, the in-memory run
(:func:`emalign.pipeline.align_in_memory`) and the SLURM recipe (``workflows/slurm/submit.sh``). Functions are
named as ``"module:function"`` and imported when a stage runs, so reading the table (``emalign --help``) loads
neither torch nor the pipeline.

Units of work (:attr:`Stage.unit`) and how the runner calls a stage's ``task`` for each:

* :data:`BLOCK`: one task per z-block of the plan, ``task(ws, stack, block, device=device)``.
* :data:`BLOCK_TILE`: one per (z-block, xy task tile), ``task(ws, stack, block, tile, device=device)``.
* :data:`TILE`: one per xy task tile through the whole stack, ``task(ws, tile)`` (``--z-range`` does not apply).
* :data:`ONE`: a single task, ``task(ws, stack, device, progress)``.
* ``""``: no tasks, only the global step.

``stack`` is the working-resolution stack, or the input itself for a stage that ``reads`` ``"input"``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from emalign.errors import EmalignError

BLOCK, BLOCK_TILE, TILE, ONE = "block", "block x tile", "tile", "one"
BLOCK_UNITS = (BLOCK, BLOCK_TILE)
"""Units whose tasks split the stack in z: a ``--z-range`` selects some, and a SLURM recipe runs them as arrays."""
TASK, TASK_SOLVE, SECTION = "task", "task+solve", "section"
"""Completion markers (:attr:`Stage.markers`): ``OUT/stages/<name>`` with one element per task (and one more
for the global step), or ``OUT/done`` with one per rendered section."""


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name (its ``emalign`` command, its ``OUT/stages/<name>`` markers).
        summary: the command's help line.
        requires: stages whose every marker must be set before this one runs (one that is off is not needed).
        unit: what a task covers (see the module doc); ``""``: no tasks.
        task: ``"module:function"`` run per unit of work.
        reads: ``"working"`` (the working-resolution stack) or ``"input"`` (the input as given).
        gate: ``"module:function"``, ``gate(ws) -> str | None``: decides from the data whether the stage runs;
            a returned report ends it there.
        solve: ``"module:function"``, ``solve(ws, blocks) -> str``: the global step, run once every task is
            done (``blocks``: the z-blocks this run did); returns the stage's report.
        markers: :data:`TASK`, :data:`TASK_SOLVE`, :data:`SECTION`, or ``""`` (none: the stage always runs).
        switch: an :class:`emalign.pipeline.AlignParams` field that turns the stage off while it is 0.
        in_memory: run by :func:`emalign.pipeline.align_in_memory` (the fields, not the written pyramid).
    """

    name: str
    summary: str
    requires: tuple[str, ...] = ()
    unit: str = ""
    task: str = ""
    reads: str = "working"
    gate: str = ""
    solve: str = ""
    markers: str = TASK
    switch: str = ""
    in_memory: bool = True

    def is_on(self, params: object) -> bool:
        """Whether the stage runs under ``params`` (an :class:`emalign.pipeline.AlignParams`)."""
        return not self.switch or bool(getattr(params, self.switch))

    def tasks(self, blocks: int, tiles: int) -> int:
        """Number of tasks of this stage in a plan of ``blocks`` z-blocks and ``tiles`` xy task tiles."""
        return {BLOCK: blocks, BLOCK_TILE: blocks * tiles, TILE: tiles, ONE: 1}.get(self.unit, 0)

    def marker_count(self, blocks: int, tiles: int) -> int:
        """Length of ``OUT/stages/<name>`` (0: the stage has no such array)."""
        if self.markers not in (TASK, TASK_SOLVE):
            return 0
        return self.tasks(blocks, tiles) + (self.markers == TASK_SOLVE)


PIPELINE = "emalign.pipeline.run"
TABLE: tuple[Stage, ...] = (
    Stage(
        "prealign",
        "Stage 1: section statistics, pairwise rigid estimates, global rigid solve.",
        unit=BLOCK,
        task="emalign.pipeline.estimate:prealign_block",
        solve=f"{PIPELINE}:finish_prealign",
    ),
    Stage(
        "adapt",
        "Stage 1b (--adapt N): fine-tune the model on this stack, unsupervised.",
        requires=("prealign",),
        unit=ONE,
        task=f"{PIPELINE}:adapt_task",
        solve=f"{PIPELINE}:finish_adapt",
        switch="adapt",
    ),
    Stage(
        "estimate",
        "Stage 2: the network's field of every section against its neighbours.",
        requires=("prealign", "adapt"),
        unit=BLOCK_TILE,
        task="emalign.pipeline.estimate:estimate_block",
    ),
    Stage(
        "stitch",
        "Stage 3: reconcile the relative fields into one stitched field per section.",
        requires=("estimate",),
        unit=TILE,
        task="emalign.pipeline.stitch:stitch",
        solve=f"{PIPELINE}:finish_stitch",
    ),
    Stage(
        "refine",
        "Stage 4: translations of the stitched sections against slow wander along z.",
        requires=("stitch",),
        unit=BLOCK,
        task="emalign.pipeline.refine:refine_block",
        solve=f"{PIPELINE}:finish_refine",
        markers=TASK_SOLVE,
    ),
    Stage(
        "polish",
        "Stage 5: patch-wise translations of the refined sections (at fine z-spacing).",
        requires=("refine",),
        unit=BLOCK,
        task="emalign.pipeline.polish:polish_block",
        gate=f"{PIPELINE}:polish_gate",
        solve=f"{PIPELINE}:finish_polish",
        markers=TASK_SOLVE,
    ),
    Stage(
        "render",
        "Stage 6: warp the sections and write the aligned pyramid.",
        requires=("polish",),
        unit=BLOCK,
        task="emalign.pipeline.render:render_block",
        reads="input",
        solve=f"{PIPELINE}:finish_render",
        markers=SECTION,
        in_memory=False,
    ),
    Stage(
        "qc",
        "Stage 7: per-section quality table (qc.csv), plot (qc.png) and summary.",
        solve=f"{PIPELINE}:finish_qc",
        markers="",
        in_memory=False,
    ),
)
STAGES = tuple(stage.name for stage in TABLE)
"""The stages' names, in the order ``emalign align`` runs them."""
IN_MEMORY_STAGES = tuple(stage.name for stage in TABLE if stage.in_memory)
"""What :func:`emalign.pipeline.align_in_memory` runs: the fields, not the written pyramid or the QC."""
MARKED = tuple(stage for stage in TABLE if stage.marker_count(1, 1))
"""Stages with an ``OUT/stages/<name>`` array, in the order they are created (the last one created last)."""


def stage(name: str) -> Stage:
    """The table's entry for ``name`` (one-line error for an unknown stage)."""
    for entry in TABLE:
        if entry.name == name:
            return entry
    raise EmalignError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")


def requirements(name: str, params: object) -> tuple[str, ...]:
    """The stages that must be finished before ``name`` runs under ``params`` (those turned off left out)."""
    return tuple(needed for needed in stage(name).requires if stage(needed).is_on(params))


def function(reference: str) -> Callable:
    """The function a ``"module:function"`` reference of the table names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)
