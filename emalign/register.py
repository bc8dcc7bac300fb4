"""Register a short stack in memory (notebooks, the napari widget, tests): the pipeline's stages
in a temporary folder, the aligned stack and the fields handed back as arrays.

The sections get what ``emalign align`` gives them: the robust rigid prealignment, the network,
the refine and polish stages. Two ways to run the network between them:

* ``"stitched"`` (default, the pipeline's): every section against its neighbours on both sides
  (symmetric window), and one least-squares reconciliation of all the relative fields
  (:mod:`emalign.consensus`), so errors do not random-walk along z.
* ``"sequential"`` (the paper's): section by section in z order, each section (in the globally
  prealigned frame) against the ``K`` most recent *aligned* ones (mirrored window). The network's
  field is shrunk by :data:`SEQUENTIAL_LEASH`: an error that reaches the next section through its
  references is passed on with a factor ``1 - SEQUENTIAL_LEASH`` and dies out along z instead of
  accumulating. The pass runs twice, up and down the stack, and each section gets the mean of its
  two fields: their errors are partly independent, and the first section of a segment, which has no
  aligned references on the way up, gets its field from the way down (40 nm FlyEM benchmark, when
  introduced: 3.15 / 2.21 / 2.17 px one way, 2.79 / 2.03 / 1.99 both ways). (Chaining each section
  rigidly onto the previous output instead, with no leash, the same weights went chaotic on that
  stack: 18 px rms.)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from emalign import io, models
from emalign.device import resolve_device
from emalign.errors import EmalignError
from emalign.fields import affine_field, compose, resample, warp
from emalign.inference import predict_windows
from emalign.io import cast_to_dtype, check_array
from emalign.models.faemreg import FAEMReg
from emalign.pipeline import AlignParams, Workspace, run_stage
from emalign.pipeline.estimate import read_masked, smooth_field, user_mask

METHODS = ("stitched", "sequential")
MIN_SIDE = 4
"""Smallest section side (px): the network's padding and the rigid stage's 2x downsampling need it."""
SEQUENTIAL_LEASH = 0.2
"""Fraction of the network's field the sequential inference leaves out. Measured through the whole
chain (prealign, sequential pass, refine, polish; rms / adj / drift px) on the 40 nm FlyEM benchmark
stack, one way: 0 -> 3.55 / 2.29 / 2.22, 0.2 -> 3.31 / 2.23 / 2.09, 0.4 -> 3.22 / 2.30 / 2.07, 0.6 -> 3.21 / 2.49 /
2.08; on sample 1 at 40 nm 4.47 / 4.33 / 4.52 / 4.99 rms, and at 10 nm the lowest adj with 0.2 on both. Both ways
(the pass as it is now): 0 -> 2.79 / 2.03 / 1.95, 0.1 -> 2.78 / 2.02 / 1.96, 0.2 -> 2.79 / 2.03 / 1.99, 0.3 -> 2.81 /
2.09 / 2.01; 0.2 moves the aligned stacks least (40 nm 2.06 px rms, 10 nm 1.08)."""
STAGES = ("prealign", "adapt", "estimate", "stitch", "refine", "polish")


@dataclass
class Registration:
    """Result of :func:`register_sections`.

    Attributes:
        aligned: ``(Z, Y, X)`` aligned stack, the input's dtype.
        fields: ``(Z, 2, Y, X)`` float32 pull fields, full resolution:
            ``aligned[z] = warp(stack[z], fields[z])``.
    """

    aligned: np.ndarray
    fields: np.ndarray


def full_resolution_fields(ws: Workspace, name: str = "fields/global") -> np.ndarray:
    """``(Z, 2, Y, X)`` float32: the workspace's field grids ``name`` resampled to every pixel."""
    grid, stride, shape = ws.array(name), ws.params.stride, ws.plan.shape[1:]
    return np.stack([resample(np.asarray(grid[z]), stride, 1, shape) for z in range(ws.plan.shape[0])])


def sequential_pass(ws: Workspace, net: FAEMReg, device: torch.device, progress: bool = False) -> None:
    """The network stage the paper's way: ``fields/stitched`` from a pass up and a pass down the stack, averaged
    (see the module doc).

    Works on a prealigned workspace; blank or damaged sections keep their rigid placement and are not
    used as references; a break starts the chain again. Marks the estimate and stitch stages done.
    """
    ws.require("prealign")
    params, plan = ws.params, ws.plan
    k, stride, grid = net.config.references, params.stride, plan.grid_shape
    stack = io.open_stack(ws.input_path, level=params.level)
    mask = user_mask(ws, stack)
    excluded, breaks = ws.excluded(), set(ws.breaks())
    matrices = np.asarray(ws.array("coarse/matrices")[:])
    depth = plan.shape[0]
    passes = [range(depth), range(depth - 1, -1, -1)]
    fine = np.zeros((depth, 2, *grid), np.float32)
    estimates = np.zeros(depth)  # passes in which each section had aligned references
    for order in passes:
        aligned: list[np.ndarray] = []  # this segment's aligned sections, the most recent last
        backward = order.step < 0
        for z in tqdm(order, desc="sequential", disable=not progress):
            if (z + 1 if backward else z) in breaks:
                aligned = []
            if excluded[z]:
                continue
            _, section = read_masked(stack, z, mask)
            prealigned = warp(section, affine_field(matrices[z], section.shape))
            field = np.zeros((2, *grid), np.float32)
            if aligned:
                refs = [aligned[max(len(aligned) - d, 0)] for d in range(1, k + 1)]
                window = np.stack(refs[::-1] + [prealigned] + refs)[None]
                raw = predict_windows(net, window, device, tile=params.tile, halo=params.halo)[0]
                field = (1 - SEQUENTIAL_LEASH) * smooth_field(raw[:, ::stride, ::stride], params.smoothing / stride)
                fine[z] += field
                estimates[z] += 1
            aligned = [*aligned, warp(prealigned, resample(field, stride, 1, section.shape))][-k:]
    output = ws.array("fields/stitched")
    for z in range(depth):
        mean = fine[z] / max(estimates[z], 1.0)
        output[z] = compose(affine_field(matrices[z], grid, stride=stride), mean, stride=stride)
    for index in range(len(plan.blocks())):
        ws.mark_done("estimate", index)
    ws.mark_done("stitch", 0)


def _align_params(model: str, options: dict) -> AlignParams:
    known = {f.name for f in dataclass_fields(AlignParams)} - {"model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise EmalignError(f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    return AlignParams(model=model, **options)


def register_sections(
    stack: np.ndarray,
    model: str | FAEMReg = models.DEFAULT_MODEL,
    method: str = "stitched",
    device: str = "auto",
    progress: bool = False,
    report: Callable[[int, int], None] | None = None,
    **options: object,
) -> Registration:
    """Align a short ``(Z, Y, X)`` stack held in memory, as ``emalign align`` would.

    Args:
        stack: sections in z order (uint8/uint16/int/float; zeros are no data).
        model: a shipped model name, a checkpoint path, or a loaded :class:`FAEMReg`.
        method: ``"stitched"`` (default) or ``"sequential"`` (the paper's inference, leashed).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: show the stages' progress bars.
        report: called as ``report(done, total)`` after each stage.
        options: :class:`emalign.pipeline.AlignParams` fields (``stride``, ``spring``, ``polish``,
            ``skip``, ``adapt``, ...).

    Returns:
        :class:`Registration` with the aligned stack and the full-resolution fields.
    """
    stack = check_array(stack, "stack")
    if min(stack.shape[1:]) < MIN_SIDE:
        raise EmalignError(
            f"stack: sections of {stack.shape[1]} x {stack.shape[2]} px are too small to align "
            f"(need at least {MIN_SIDE} px per side)"
        )
    if method not in METHODS:
        raise EmalignError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    dev = resolve_device(device)
    net = model if isinstance(model, FAEMReg) else models.load(model)
    with tempfile.TemporaryDirectory(prefix="emalign-register-") as tmp:
        checkpoint = Path(tmp) / "model.pt"
        models.save_checkpoint(checkpoint, net)
        params = _align_params(str(checkpoint), options)
        source = io.create_array(Path(tmp) / "input.zarr", "stack", stack.shape, (1, *stack.shape[1:]), stack.dtype)
        source[:] = stack
        ws = Workspace.create(io.open_stack(Path(tmp) / "input.zarr" / "stack"), Path(tmp) / "aligned.zarr", params)
        stages = [stage for stage in STAGES if stage != "adapt" or params.adapt]
        for done, stage in enumerate(stages, start=1):
            if method == "sequential" and stage in ("estimate", "stitch"):
                if stage == "estimate":
                    sequential_pass(ws, models.load(ws.model, dev), dev, progress)
            else:
                run_stage(stage, ws, device=device, progress=progress)
            if report is not None:
                report(done, len(stages))
        result = full_resolution_fields(ws)
    aligned = np.stack(
        [cast_to_dtype(warp(stack[z].astype(np.float32), result[z]), stack.dtype) for z in range(len(stack))]
    )
    return Registration(aligned=aligned, fields=result)


__all__ = ["METHODS", "Registration", "full_resolution_fields", "register_sections", "sequential_pass"]
