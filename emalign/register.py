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
  accumulating. Then the pass turns around (:data:`SEQUENTIAL_PASSES`): down the stack and up again,
  each section now sees aligned references on both sides (a symmetric window, the network's main
  training case): those this pass has just aligned, and the previous pass's on the side it has not
  reached yet. Each section keeps its last pass's field; the first section of a segment, which has no
  aligned references on the way up, gets its field on the way back. (Chaining each section rigidly
  onto the previous output instead, with no leash, the same weights went chaotic at 40 nm: an error
  fed back as a reference grows instead of dying out.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

import numpy as np
import torch
from tqdm.auto import tqdm

from emalign import models
from emalign.device import resolve_device
from emalign.errors import EmalignError
from emalign.fields import affine_field, compose, resample, warp
from emalign.inference import predict_windows
from emalign.io import check_array
from emalign.models.faemreg import FAEMReg
from emalign.pipeline import AlignParams, Workspace, align_in_memory, full_resolution_fields
from emalign.pipeline.estimate import read_masked, smooth_field, user_mask, working_model

METHODS = ("stitched", "sequential")
MIN_SIDE = 4
"""Smallest section side (px): the network's padding and the rigid stage's 2x downsampling need it."""
SEQUENTIAL_LEASH = 0.2
"""Fraction of the network's field the sequential inference leaves out, so that an error passed on through
the references dies out along z. Chosen through the whole chain (prealign, sequential pass, refine,
polish) against 0, 0.4 and 0.6: the lowest section-to-section error at 10 and 40 nm (figures:
benchmarks/results/design_choices.md)."""
SEQUENTIAL_PASSES = 3
"""Passes of the sequential inference, alternating up and down the stack (see the module doc): three did better
than two, and a fourth no longer helped (figures: benchmarks/results/design_choices.md)."""


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


def _segments(excluded: np.ndarray, breaks: tuple[int, ...]) -> list[list[int]]:
    """The good (non-excluded) sections of each segment between ``breaks``, in z order."""
    segments: list[list[int]] = [[]]
    for z, bad in enumerate(excluded):
        if z in breaks:
            segments.append([])
        if not bad:
            segments[-1].append(z)
    return [segment for segment in segments if segment]


def sequential_pass(ws: Workspace, net: FAEMReg, device: torch.device, progress: bool = False) -> None:
    """The network stage the paper's way, in :data:`SEQUENTIAL_PASSES` passes (see the module doc): ``fields/stitched``.

    Works on a prealigned workspace; blank or damaged sections keep their rigid placement and are not
    used as references; a break starts the chain again. Holds one segment's sections (three copies) in
    memory: it is the in-memory API's method. Marks the estimate and stitch stages done.
    """
    ws.check_requirements("estimate")
    params, plan = ws.params, ws.plan
    k, stride, grid = net.config.references, params.stride, plan.grid_shape
    stack = ws.working_stack()
    mask = user_mask(ws, stack)
    matrices = np.asarray(ws.array("coarse/matrices")[:])
    depth = plan.shape[0]
    prealigned: dict[int, np.ndarray] = {}

    def prealigned_section(z: int) -> np.ndarray:
        if z not in prealigned:
            _, section = read_masked(stack, z, mask)
            prealigned[z] = warp(section, affine_field(matrices[z], section.shape))
        return prealigned[z]

    def leashed_field(below: list[np.ndarray], z: int, above: list[np.ndarray]) -> np.ndarray:
        """Section ``z``'s field against aligned references (nearest first; a missing side mirrors the other)."""
        below, above = below or above, above or below
        window = [below[min(d, len(below) - 1)] for d in range(k)][::-1] + [prealigned_section(z)]
        window += [above[min(d, len(above) - 1)] for d in range(k)]
        raw = predict_windows(net, np.stack(window)[None], device, tile=params.tile, halo=params.halo)[0]
        return (1 - SEQUENTIAL_LEASH) * smooth_field(raw[:, ::stride, ::stride], params.smoothing / stride)

    fine = np.zeros((depth, 2, *grid), np.float32)
    segments = _segments(ws.excluded(), ws.breaks())
    bar = tqdm(total=SEQUENTIAL_PASSES * sum(map(len, segments)), desc="sequential", disable=not progress)
    for segment in segments:
        previous: dict[int, np.ndarray] = {}  # the last pass's aligned sections
        for index in range(SEQUENTIAL_PASSES):
            upward = index % 2 == 0
            order = segment if upward else segment[::-1]
            current: dict[int, np.ndarray] = {}
            for i, z in enumerate(order):
                behind = [current[order[j]] for j in range(i - 1, max(i - 1 - k, -1), -1)]
                ahead = [previous[order[j]] for j in range(i + 1, min(i + 1 + k, len(order)))] if previous else []
                if behind or ahead:
                    fine[z] = leashed_field(behind, z, ahead) if upward else leashed_field(ahead, z, behind)
                current[z] = warp(prealigned_section(z), resample(fine[z], stride, 1, prealigned_section(z).shape))
                bar.update()
            previous = current
        prealigned.clear()
    bar.close()
    output = ws.array("fields/stitched")
    for z in range(depth):
        output[z] = compose(affine_field(matrices[z], grid, stride=stride), fine[z], stride=stride)
    for stage in ("estimate", "stitch"):
        ws.array(f"stages/{stage}")[:] = True


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
    params = _align_params(models.DEFAULT_MODEL, options)

    def sequential(ws: Workspace) -> None:
        sequential_pass(ws, working_model(models.load(ws.model, dev), ws.resolution.ratio), dev, progress)

    network = sequential if method == "sequential" else None
    aligned, fields = align_in_memory(stack, model, params, device, progress, report, network)
    return Registration(aligned=aligned, fields=fields)


__all__ = ["METHODS", "Registration", "full_resolution_fields", "register_sections", "sequential_pass"]
