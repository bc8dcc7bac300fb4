"""Stage 1b (``--adapt N``): fine-tune the network on the stack it is about to align, without labels.

The training data is a bounded sample of the input: the longest run of good sections (at most
:data:`SECTIONS`), cropped to at most :data:`SIZE` px about the centre, so memory does not grow
with the stack; rigidly prealigned, then aligned by the base model (the in-memory pipeline). Windows
of adjacent sections cut from it get the synthetic misalignment of :mod:`emalign.train` (exact
targets, which assume the sample aligned) and the unsupervised local-NCC term towards their
references, so the network learns this stack's texture, contrast and section-to-section change
before it estimates anything. The adapted checkpoint is written to ``OUT/model/adapted.pt`` with
its provenance and used by the estimate stage.

Why align the sample first: on a prealigned-only sample the synthetic targets are off by the
misalignment the prealignment leaves, and the network learns to leave that in place: adapting on the
prealigned sample ended worse than no adaptation, on the aligned one slightly better (figures:
benchmarks/results/design_choices.md).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from emalign import models
from emalign.errors import EmalignError
from emalign.fields import affine_field
from emalign.io import Stack
from emalign.pipeline.plan import AlignParams
from emalign.pipeline.render import render_region
from emalign.pipeline.store import Workspace
from emalign.train import TrainConfig, train, window_margin

SECTIONS = 48
SIZE = 384
FIELD_STRIDE = 16  # grid of the affine fields the sample is rendered with (exact for an affine map)
InMemoryAligner = Callable[[np.ndarray, str, AlignParams | None, str], tuple[np.ndarray, np.ndarray]]
"""``(stack, model, params, device) -> (aligned, fields)``: :func:`emalign.pipeline.align_in_memory`, handed in by
the runner (this stage runs the pipeline on its sample, and the pipeline imports this stage)."""


def longest_run(excluded: np.ndarray, limit: int) -> tuple[int, int]:
    """``[start, stop)`` of the longest run of non-excluded sections, trimmed to ``limit`` about its centre."""
    best, start = (0, 0), None
    for z, bad in enumerate([*np.asarray(excluded, bool), True]):
        if not bad and start is None:
            start = z
        elif bad and start is not None:
            best = max(best, (start, z), key=lambda run: run[1] - run[0])
            start = None
    lo, hi = best
    trim = max(0, (hi - lo) - limit)
    return lo + trim // 2, hi - (trim - trim // 2)


def prealigned_sample(ws: Workspace, stack: Stack) -> tuple[np.ndarray, dict]:
    """The rigidly prealigned sample ``(Z', Y', X')`` float32 of the stack, and where it came from."""
    start, stop = longest_run(ws.excluded(), SECTIONS)
    height, width = stack.shape[1:]
    shape = (min(SIZE, height), min(SIZE, width))
    origin = ((height - shape[0]) // 2, (width - shape[1]) // 2)
    matrices = np.asarray(ws.array("coarse/matrices")[:])
    grid = (math.ceil(height / FIELD_STRIDE), math.ceil(width / FIELD_STRIDE))
    sample = np.stack(
        [
            render_region(stack, z, affine_field(matrices[z], grid, stride=FIELD_STRIDE), FIELD_STRIDE, origin, shape)
            for z in range(start, stop)
        ]
    )
    return sample, {"sections": [start, stop], "origin": list(origin), "shape": list(shape)}


def aligned_sample(sample: np.ndarray, model: str, align: InMemoryAligner, device: str = "auto") -> np.ndarray:
    """``sample (Z', Y', X')`` aligned by ``model`` through the in-memory pipeline ``align``, float32."""
    return align(sample, model, None, device)[0].astype(np.float32)


def adaptation_config(model: str, steps: int, sample_shape: tuple[int, int, int], device: str = "auto") -> TrainConfig:
    """Fine-tuning settings for a stack sample: adjacent sections, the pipeline's residual motion, small lr."""
    depth, height, width = sample_shape
    cfg = TrainConfig(
        model=str(models.checkpoint_path(model)),  # fine-tune the trained weights (a bare name trains from scratch)
        procedural=0,
        z_steps=(1,),
        same_section_start=0.0,
        same_section_end=0.0,
        symmetric_fraction=1.0,
        steps=steps,
        batch=4,
        crop=128,
        lr=2e-4,
        similarity_weight=0.5,
        shift=1.5,
        rotation_deg=0.3,
        val_every=steps,
        val_windows=8,
        val_z_step=1,
        device=device,
    )
    crop = min(cfg.crop, min(height, width) - 2 * window_margin(cfg)) // 8 * 8
    if crop < 32 or depth < 2:
        raise EmalignError(
            f"--adapt: the sample ({depth} good sections of {height} x {width} px) is too small to adapt on"
        )
    return TrainConfig(**{**cfg.to_dict(), "crop": crop})


def adapt_model(
    ws: Workspace, stack: Stack, align: InMemoryAligner, device: str = "auto", progress: bool = True
) -> Path:
    """Fine-tune ``ws.params.model`` on a sample of the stack aligned by it (``align``: the in-memory pipeline),
    for ``ws.params.adapt`` steps; returns the checkpoint."""
    params = ws.params
    sample, origin = prealigned_sample(ws, stack)
    cfg = adaptation_config(params.model, params.adapt, sample.shape, device)
    sample = aligned_sample(sample, params.model, align, device)
    origin["aligned_by"] = params.model
    runs = ws.files / "model" / "run"
    if runs.exists():
        shutil.rmtree(runs)  # a killed adaptation starts over: the result must not depend on where it stopped
    history = train(cfg, runs, resume=False, progress=progress, volumes=[sample], val_volumes=[sample])
    ckpt = torch.load(runs / "best.pt", map_location="cpu", weights_only=False)
    ckpt["adaptation"] = {
        "base_model": params.model,
        "base_sha256": models.checksum(params.model),
        "input": ws.input_path,
        "steps": params.adapt,
        "sample": origin,
        "val_epe_px": history["val_epe"][-1],
        "val_epe_no_correction_px": history["val_epe_identity"][-1],
    }
    target = ws.adapted_model_path
    torch.save(ckpt, target.with_suffix(".tmp"))
    target.with_suffix(".tmp").replace(target)
    ws.publish(target)
    shutil.rmtree(runs)
    ws.mark_done("adapt", 0)
    return target


__all__ = ["adapt_model", "adaptation_config", "aligned_sample", "longest_run", "prealigned_sample"]
