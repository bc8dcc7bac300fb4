"""Register a short stack in memory: the engine without the pipeline (notebooks, tests).

Two ways to run the network over a stack:

* ``"sequential"``: the paper's inference. Section 0 is the anchor; each next section is
  rigidly prealigned to the last output and registered against the ``K`` most recent
  *aligned* outputs (mirrored window). Errors can compound along z.
* ``"stitched"``: the pipeline's. A coarse rigid stage from redundant pairwise estimates,
  then every section against its neighbours on both sides (symmetric window), and one
  least-squares reconciliation of all the relative fields (:mod:`emalign.consensus`), so
  errors do not random-walk along z.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from emalign import consensus, models, rigid
from emalign.device import resolve_device
from emalign.errors import EmalignError
from emalign.fields import compose, resample, warp
from emalign.inference import predict_windows
from emalign.io import cast_to_dtype, check_array
from emalign.models.faemreg import FAEMReg

METHODS = ("sequential", "stitched")
MIN_SIDE = 4
"""Smallest section side (px): the network's padding and the rigid stage's 2x downsampling need it."""


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


def _sequential(stack: np.ndarray, model: FAEMReg, device: torch.device, progress: bool) -> np.ndarray:
    k = model.config.references
    depth, height, width = stack.shape
    fields = np.zeros((depth, 2, height, width), np.float32)
    aligned = [stack[0].astype(np.float32)]
    for z in tqdm(range(1, depth), desc="register", disable=not progress):
        raw = stack[z].astype(np.float32)
        coarse = rigid.estimate_rigid(aligned[-1], raw).matrix
        coarse_field = rigid.affine_fields(coarse[None], (height, width))[0]
        refs = [aligned[max(z - d, 0)] for d in range(1, k + 1)]
        window = np.stack(refs[::-1] + [warp(raw, coarse_field)] + refs)[None]
        fine = predict_windows(model, window, device)[0]
        fields[z] = compose(coarse_field, fine)
        aligned.append(warp(raw, fields[z]))
    return fields


def _stitched(
    stack: np.ndarray, model: FAEMReg, device: torch.device, spring: float, stride: int, progress: bool
) -> np.ndarray:
    k = model.config.references
    depth, height, width = stack.shape
    excluded = np.array([not np.any(section) for section in stack])
    pairs = rigid.pairwise_rigid(stack, downsample=2)
    matrices = rigid.solve_rigid(depth, pairs, (height, width)) if depth > 1 else np.eye(2, 3)[None]
    coarse = rigid.affine_fields(matrices, (height, width))
    prealigned = np.stack([warp(stack[z].astype(np.float32), coarse[z]) for z in range(depth)])
    grid = (len(range(0, height, stride)), len(range(0, width, stride)))
    relative = np.zeros((depth, 2, *grid), np.float32)
    for z in tqdm(range(depth), desc="estimate", disable=not progress):
        if excluded[z]:
            continue
        window = prealigned[consensus.neighbour_indices(z, depth, k)]
        relative[z] = predict_windows(model, window[None], device)[0][:, ::stride, ::stride]
    correction = consensus.solve_block(relative, k, excluded, spring)
    fields = np.zeros((depth, 2, height, width), np.float32)
    for z in range(depth):
        fine = resample(correction[z], stride, 1, (height, width))
        fields[z] = compose(coarse[z], fine)
    return fields


def register_sections(
    stack: np.ndarray,
    model: str | FAEMReg = models.DEFAULT_MODEL,
    method: str = "stitched",
    device: str = "auto",
    spring: float = 0.05,
    stride: int = 8,
    progress: bool = False,
) -> Registration:
    """Align a short ``(Z, Y, X)`` stack held in memory.

    Args:
        stack: sections in z order (uint8/uint16/int/float; zeros are no data).
        model: a shipped model name, a checkpoint path, or a loaded :class:`FAEMReg`.
        method: ``"stitched"`` (default) or ``"sequential"`` (the paper's inference).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        spring: stitched only: pull towards the rigidly prealigned geometry.
        stride: stitched only: grid spacing (px) of the stitched fields.

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
    net = model if isinstance(model, FAEMReg) else models.load(model, dev)
    net = net.to(dev).eval()
    if method == "sequential":
        fields = _sequential(stack, net, dev, progress)
    else:
        fields = _stitched(stack, net, dev, spring, stride, progress)
    aligned = np.stack(
        [cast_to_dtype(warp(stack[z].astype(np.float32), fields[z]), stack.dtype) for z in range(len(stack))]
    )
    return Registration(aligned=aligned, fields=fields)


__all__ = ["METHODS", "Registration", "register_sections"]
