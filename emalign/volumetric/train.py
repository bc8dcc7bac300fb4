"""Training of the volumetric networks on pairs made by known smooth 3D deformations.

Each example is a (fixed, moving) pair cut from an aligned volume (:func:`emalign.volumetric.data.make_pair`):
``fixed = warp(block, g)``, ``moving = block``, with ``g`` a random affine + elastic field. The
loss is unsupervised, as in the papers: similarity of ``warp(moving, u)`` to ``fixed`` (local NCC or
global Pearson) + smoothness of the model's fields (every SDHNet increment, every RDN stage) +
SDHNet's self-distillation; optional terms: the end-point error to the known ``g``
(``supervised_weight``) and a soft Dice of trilinearly warped one-hot labels (``dice_weight``,
when the volumes have labels). Validation reports the end-point error to ``g`` (voxels) and, with
labels, the Dice of nearest-neighbour warped labels.

CRD (:func:`train_crd`) follows the paper's schedule: (1) the feature-shifted teacher, trained
with the unsupervised loss; (2) the low-resolution model alone, same loss; (3) the student,
initialised from (2), trained with the distillation loss against the frozen teacher.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from emalign import volumetric
from emalign.device import autocast, resolve_device
from emalign.errors import EmalignError
from emalign.fields import warp_torch
from emalign.volume_train_config import VolumeTrainConfig
from emalign.volumetric.common import VolumeNet, VolumeOutput
from emalign.volumetric.crd import distillation_loss
from emalign.volumetric.data import DeformationSpec, Pair, cells_volume, make_pair, make_pairs, normalise
from emalign.volumetric.losses import (
    endpoint_error,
    mean_dice,
    one_hot,
    similarity_loss,
    smoothness,
    soft_dice_loss,
)
from emalign.volumetric.sdhnet import self_distillation_loss

VAL_MARGIN = 4
"""Voxels at each face left out of the validation end-point error (content from outside the block)."""


def deformation(cfg: VolumeTrainConfig) -> DeformationSpec:
    """The random deformation of the training and validation pairs that ``cfg`` asks for."""
    return DeformationSpec(cfg.shift, cfg.rotation, cfg.scale, cfg.elastic, cfg.correlation)


Source = tuple[np.ndarray, np.ndarray | None]
"""A standardised aligned volume (float32, :func:`~emalign.volumetric.data.normalise`) and its labels (or None)."""


def load_sources(paths: Sequence[str], label_paths: Sequence[str] = ()) -> list[Source]:
    """Read aligned volumes (TIFF/Zarr, via :func:`emalign.io.open_stack`) and optional label volumes."""
    from emalign.io import open_stack

    if label_paths and len(label_paths) != len(paths):
        raise EmalignError(f"--labels: {len(label_paths)} label volume(s) for {len(paths)} data volume(s)")
    sources = []
    for i, path in enumerate(paths):
        volume = normalise(np.asarray(open_stack(path).data.compute()))
        labels = None
        if label_paths:
            labels = np.asarray(open_stack(label_paths[i]).data.compute()).astype(np.int32)
            if labels.shape != volume.shape:
                raise EmalignError(f"{label_paths[i]}: labels of shape {labels.shape} != data {volume.shape}")
        sources.append((volume, labels))
    return sources


def procedural_sources(count: int, size: int, seed: int) -> list[Source]:
    """Procedural EM-like volumes with labels (:func:`emalign.volumetric.data.cells_volume`)."""
    out = []
    for i in range(count):
        image, labels = cells_volume((size,) * 3, seed=seed + i)
        out.append((normalise(image), labels))
    return out


def to_batch(pairs: Sequence[Pair], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack pairs into tensors ``fixed``/``moving`` ``(N, 1, Z, Y, X)``, ``field`` ``(N, 3, Z, Y, X)`` (+ labels)."""
    batch = {
        "fixed": torch.from_numpy(np.stack([p.fixed for p in pairs]))[:, None],
        "moving": torch.from_numpy(np.stack([p.moving for p in pairs]))[:, None],
        "field": torch.from_numpy(np.stack([p.field for p in pairs])),
    }
    if all(p.fixed_labels is not None for p in pairs):
        batch["fixed_labels"] = torch.from_numpy(np.stack([p.fixed_labels for p in pairs]))[:, None]
        batch["moving_labels"] = torch.from_numpy(np.stack([p.moving_labels for p in pairs]))[:, None]
    return {k: v.to(device) for k, v in batch.items()}


def _label_dice(batch: dict[str, torch.Tensor], field: torch.Tensor, largest: int = 8) -> torch.Tensor:
    """Soft Dice loss of the ``largest`` labels of the fixed volume, moving one-hot maps warped trilinearly."""
    labels = batch["fixed_labels"]
    ids, counts = torch.unique(labels[labels != 0], return_counts=True)
    ids = ids[torch.argsort(counts, descending=True)[:largest]]
    warped = warp_torch(one_hot(batch["moving_labels"], ids), field.float())
    return soft_dice_loss(warped, one_hot(labels, ids))


def unsupervised_loss(
    out: VolumeOutput, batch: dict[str, torch.Tensor], cfg: VolumeTrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Similarity + smoothness (+ SDHNet distillation, affine penalty, optional supervision and Dice)."""
    field = out.field.float()
    warped = warp_torch(batch["moving"], field)
    sim = similarity_loss(cfg.similarity, batch["fixed"], warped)
    smooth = sum(smoothness(f) for f in out.increments) if out.increments else smoothness(field)
    loss = sim + cfg.smooth_weight * smooth
    metrics = {"similarity": sim.item(), "smoothness": smooth.item()}
    if out.intermediates and cfg.distill_weight:
        distill = self_distillation_loss([f.float() for f in out.intermediates], field)
        loss = loss + cfg.distill_weight * distill
        metrics["self_distillation"] = distill.item()
    if out.penalty is not None:
        loss = loss + out.penalty.float()
    if cfg.supervised_weight:
        epe = endpoint_error(field, batch["field"])
        loss = loss + cfg.supervised_weight * epe
        metrics["epe"] = epe.item()
    if cfg.dice_weight and "fixed_labels" in batch:
        dice = _label_dice(batch, field)
        loss = loss + cfg.dice_weight * dice
        metrics["dice_loss"] = dice.item()
    return loss, metrics


@torch.no_grad()
def validate(model: VolumeNet, pairs: Sequence[Pair], device: torch.device) -> dict[str, float]:
    """Mean end-point error to the true fields (voxels, faces excluded), identity's, and label Dice."""
    model.eval()
    epes, dices = [], []
    for pair in pairs:
        batch = to_batch([pair], device)
        with autocast(device):
            field = model(batch["fixed"], batch["moving"]).field.float()
        epes.append(float(endpoint_error(field, batch["field"], VAL_MARGIN)))
        if pair.fixed_labels is not None:
            warped = warp_torch(batch["moving_labels"].float(), field, mode="nearest")[0, 0].round().cpu().numpy()
            dices.append(mean_dice(warped, pair.fixed_labels))
    identity = [
        float(endpoint_error(0 * torch.from_numpy(p.field)[None], torch.from_numpy(p.field)[None], VAL_MARGIN))
        for p in pairs
    ]
    out = {"val_epe": float(np.mean(epes)), "val_epe_identity": float(np.mean(identity))}
    if dices:
        out["val_dice"] = float(np.nanmean(dices))
    return out


def _sources(cfg: VolumeTrainConfig) -> tuple[list[Source], list[Pair]]:
    train_sources = load_sources(cfg.data, cfg.labels)
    train_sources += procedural_sources(cfg.procedural, cfg.procedural_size, 1000 + cfg.seed)
    if not train_sources:
        raise EmalignError("nothing to train on: give --data volume(s) or --procedural N > 0")
    if cfg.val_data:
        val_sources = load_sources(cfg.val_data)
    else:
        val_sources = procedural_sources(1, max(cfg.procedural_size, cfg.crop + 40), 9000 + cfg.seed)
    per = max(1, math.ceil(cfg.val_pairs / len(val_sources)))
    val = []
    for i, (volume, labels) in enumerate(val_sources):
        val += make_pairs(volume, per, cfg.crop, 500 + i, deformation(cfg), labels=labels, noise=cfg.noise)
    return train_sources, val[: cfg.val_pairs]


def fit(
    model: VolumeNet,
    cfg: VolumeTrainConfig,
    out_dir: str | Path,
    sources: Sequence[Source],
    val: Sequence[Pair],
    steps: int,
    loss_fn: Callable[[VolumeNet, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Adam with a cosine learning rate over ``steps``; validates every ``val_every`` steps.

    Writes ``out_dir/last.pt``, ``out_dir/best.pt`` (lowest validation end-point error) and
    ``history.json``; returns the history (``step``, ``loss``, ``val_epe``, ... lists).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))
    )
    rng = np.random.default_rng(cfg.seed)
    history: dict[str, list] = {"step": [], "loss": [], "seconds": []}
    best = math.inf
    start = time.perf_counter()
    running: list[float] = []

    def evaluate(step: int) -> None:
        nonlocal best
        metrics = validate(model, val, device)
        history["step"].append(step)
        history["loss"].append(float(np.mean(running)) if running else float("nan"))
        history["seconds"].append(time.perf_counter() - start)
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        running.clear()
        record = {"train": cfg.to_dict(), "step": step, **metrics, **(extra or {})}
        volumetric.save_checkpoint(out / "last.pt", model, **record)
        if metrics["val_epe"] < best:
            best = metrics["val_epe"]
            volumetric.save_checkpoint(out / "best.pt", model, **record)
        (out / "history.json").write_text(json.dumps(history, indent=1))

    evaluate(0)
    bar = tqdm(range(1, steps + 1), desc=f"train {out.name}", disable=not progress)
    for step in bar:
        model.train()
        pairs = []
        for _ in range(cfg.batch):
            volume, labels = sources[int(rng.integers(len(sources)))]
            pairs.append(make_pair(volume, cfg.crop, rng, deformation(cfg), labels=labels, noise=cfg.noise))
        batch = to_batch(pairs, device)
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if step % cfg.val_every == 0 or step == steps:
            evaluate(step)
            bar.set_postfix(val_epe=f"{history['val_epe'][-1]:.3f}")
    return history


def _initial_model(name_or_path: str) -> VolumeNet:
    """An untrained architecture by name (:data:`emalign.volumetric.CONFIGS`), else a checkpoint to fine-tune."""
    if str(name_or_path) in volumetric.CONFIGS:
        return volumetric.build(str(name_or_path))
    return volumetric.load(name_or_path).train()


def _unsupervised(cfg: VolumeTrainConfig, device: torch.device):
    def loss_fn(model: VolumeNet, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with autocast(device):
            out = model(batch["fixed"], batch["moving"])
        return unsupervised_loss(out, batch, cfg)

    return loss_fn


def train(cfg: VolumeTrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train ``cfg.model`` (an architecture name, or a ``.pt`` to fine-tune) into ``out_dir``.

    A CRD student by name (``crd-small``, ``crd-paper``) runs the whole CRD schedule
    (:func:`train_crd`), and so does a CRD checkpoint given with ``cfg.teacher`` (distillation
    only); a CRD checkpoint without a teacher is fine-tuned with the unsupervised loss like any
    other network. Returns the history of the run that produced ``out_dir/best.pt``.
    """
    model = _initial_model(cfg.model)
    if model.kind == "crd" and (str(cfg.model) in volumetric.CONFIGS or cfg.teacher):
        return train_crd(cfg, out_dir, progress)
    torch.manual_seed(cfg.seed)
    sources, val = _sources(cfg)
    device = resolve_device(cfg.device)
    return fit(model, cfg, out_dir, sources, val, cfg.steps, _unsupervised(cfg, device), progress)


def _teacher_name(student: VolumeNet) -> str:
    """The named feature-shifted teacher whose configuration matches a CRD student's (else a config dict)."""
    for name, (family, config) in volumetric.CONFIGS.items():
        if family == "crd-teacher" and config == student.config:
            return name
    return ""


def train_crd(cfg: VolumeTrainConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """CRD's schedule: teacher (FST), then the low-resolution model, then the distilled student.

    ``out_dir/teacher/best.pt`` and ``out_dir/lowres/best.pt`` hold the first two stages (skipped
    when ``cfg.teacher`` / ``cfg.student_init`` name trained checkpoints); the student lands in
    ``out_dir/best.pt``. Stages 1 and 2 take ``cfg.steps`` steps each, stage 3
    ``cfg.distill_steps`` (default ``cfg.steps``).
    """
    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    sources, val = _sources(cfg)
    student = _initial_model(cfg.student_init or cfg.model)
    if student.kind != "crd":
        raise EmalignError(f"{cfg.student_init or cfg.model}: a CRD student must be a crd-* model, not {student.kind}")
    if cfg.teacher:
        teacher = volumetric.load(cfg.teacher, device)
    else:
        teacher = volumetric.FAMILIES["crd-teacher"][0](student.config)
        fit(teacher, cfg, out / "teacher", sources, val, cfg.steps, _unsupervised(cfg, device), progress)
        teacher = volumetric.load(out / "teacher" / "best.pt", device)
    if teacher.kind != "crd-teacher":
        raise EmalignError(f"{cfg.teacher}: the CRD teacher must be a feature-shifted teacher, not {teacher.kind}")
    if not cfg.student_init and not str(cfg.model).endswith(".pt"):
        fit(student, cfg, out / "lowres", sources, val, cfg.steps, _unsupervised(cfg, device), progress)
        student = volumetric.load(out / "lowres" / "best.pt", device).train()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(model: VolumeNet, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad(), autocast(device):
            target = teacher(batch["fixed"], batch["moving"])
        with autocast(device):
            out_s = model(batch["fixed"], batch["moving"])
        target = VolumeOutput(field=target.field.float(), attention=[a.float() for a in target.attention])
        out_s = VolumeOutput(field=out_s.field.float(), attention=[a.float() for a in out_s.attention])
        return distillation_loss(out_s, target)

    teacher_record = {
        "teacher": str(cfg.teacher or out / "teacher" / "best.pt"),
        "teacher_name": _teacher_name(student),
    }
    steps = cfg.distill_steps if cfg.distill_steps is not None else cfg.steps
    student_copy = copy.deepcopy(student)
    return fit(student_copy, cfg, out, sources, val, steps, loss_fn, progress, extra=teacher_record)
