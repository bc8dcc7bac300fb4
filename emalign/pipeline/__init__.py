"""The streaming alignment pipeline: prealign -> (adapt) -> estimate -> stitch -> refine -> polish -> render -> qc.

Each stage works on z-blocks (or xy tiles) as independent dask tasks that read their input from the
stack and the output folder and write their results straight to Zarr (nothing large is
gathered), records finished tasks, and skips them when run again: a killed run resumes
where it stopped. The stages are declared in :mod:`emalign.pipeline.stages`, run by
:mod:`emalign.pipeline.run`; the parameters and the plan are :mod:`emalign.pipeline.plan`, the output
folder :mod:`emalign.pipeline.store`.

The names below are imported on first use, so that reading the stage table or the parameters (``emalign
--help``) loads neither torch nor dask nor zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emalign.pipeline.plan import AlignParams, Plan
    from emalign.pipeline.run import align, align_in_memory, full_resolution_fields, run_stage, start_report
    from emalign.pipeline.stages import IN_MEMORY_STAGES, STAGES
    from emalign.pipeline.store import Workspace, open_workspace

_LAZY = {
    "AlignParams": "plan",
    "Plan": "plan",
    "align": "run",
    "align_in_memory": "run",
    "full_resolution_fields": "run",
    "run_stage": "run",
    "start_report": "run",
    "IN_MEMORY_STAGES": "stages",
    "STAGES": "stages",
    "Workspace": "store",
    "open_workspace": "store",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "start_report",
]
