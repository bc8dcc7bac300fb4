"""Training of the serial registration networks, without labels.

Each training example is a window of ``2K + 1`` sections cut from an *aligned* stack (or a
procedural one), at a random z-step. The moving (middle) section is misaligned on the fly
by a known random field ``a`` (residual rigid motion + smooth elastic warp), the
references get a small jitter ``e_k``; the network must return the pull field that brings
the moving section into the references' (distance-weighted) frame:
``target = compose(invert(a), mean_w(e_k))``. That gives an exact, label-free target
(self-supervision from synthetic misalignment), which can be mixed with the classic
unsupervised loss: distance-weighted local NCC of the warped moving section to its
references plus smoothness. Weights of the three terms are options.

Early steps mix in *same-section* windows (every reference a copy of the moving section),
so the network first learns to match, then to match across the content change of real
neighbours (a curriculum; DESIGN.md).

Distillation (``teacher``): a trained network guides a cheaper one on the same windows, CRD-style
(fields and features): the student's field is pulled towards the teacher's (end-point error) and its
encoder features, at every level where the two have the same shape, towards the teacher's
(channel-normalised, mean squared difference). A student built from an architecture name starts
from the teacher's weights wherever names and shapes agree.

A time-boxed run (``minutes``) times its first :data:`CALIBRATION_STEPS` steps and sets its step count, and with it
the learning-rate schedule, to what fits the budget; a resumed run keeps the step count it was given.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from emalign import models
from emalign.consensus import reference_weights
from emalign.device import autocast, resolve_device, reuse_freed_memory
from emalign.errors import EmalignError
from emalign.fields import affine_field, compose_torch, invert_torch, warp_torch
from emalign.models.faemreg import FAEMReg, normalize_sections
from emalign.models.losses import endpoint_error, reference_similarity, smoothness
from emalign.train_config import TrainConfig

CALIBRATION_STEPS = 20
"""Steps a time-boxed run times before it fits its step count to the budget."""
BUDGET_MARGIN = 0.9
"""Share of a time-boxed run's remaining budget planned for steps (the rest: validations, checkpoints)."""


def steps_that_fit(done: int, step_seconds: float, remaining_seconds: float) -> int:
    """Further steps of a time-boxed run that took ``step_seconds`` for its last ``done`` steps and has
    ``remaining_seconds`` left (at least one, which validates)."""
    return max(1, int(BUDGET_MARGIN * max(remaining_seconds, 0.0) * done / max(step_seconds, 1e-9)))


def load_volume(path: str) -> np.ndarray:
    """An aligned training stack as a (Z, Y, X) array (training crops need random access)."""
    from emalign.io import open_stack

    data = open_stack(path).data
    if data.nbytes > 4 * 2**30:
        raise EmalignError(f"{path}: {data.nbytes / 2**30:.1f} GiB is too large to train from; crop it first")
    return np.asarray(data.compute())


def procedural_volumes(count: int, shape: tuple[int, int, int], seed: int) -> list[np.ndarray]:
    """``count`` procedural EM-like volumes (see :func:`emalign.synth.em_texture`)."""
    from emalign.synth import em_texture

    return [em_texture(shape, seed=seed + i, z_step=1.0 + i % 3) for i in range(count)]


def smooth_noise(
    batch: int, size: int, amplitude: torch.Tensor, length: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Random smooth fields ``(B, 2, size, size)``, per-component RMS ``amplitude`` (B,) px.

    White noise on a coarse grid (spacing ~ ``length`` px) upsampled bicubically.
    """
    out = torch.empty(batch, 2, size, size)
    for b in range(batch):
        cells = max(2, int(math.ceil(size / float(length[b]))) + 1)
        coarse = torch.randn(1, 2, cells, cells, generator=gen)
        fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0]
        fine = fine - fine.mean((1, 2), keepdim=True)
        out[b] = fine / fine.square().mean((1, 2), keepdim=True).sqrt().clamp_min(1e-6) * amplitude[b]
    return out


def random_rigid(
    batch: int, size: int, shift: float, rotation_deg: float, scale: float, gen: torch.Generator
) -> torch.Tensor:
    """Random pull affine fields about the crop centre, ``(B, 2, size, size)``."""
    fields = []
    centre = (size - 1) / 2.0
    for _ in range(batch):
        angle = math.radians(float(torch.randn(1, generator=gen)) * rotation_deg)
        s = 1.0 + float(torch.randn(1, generator=gen)) * scale
        t = torch.randn(2, generator=gen).numpy() * shift
        rot = s * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        offset = centre - rot @ np.array([centre, centre]) + t
        fields.append(torch.from_numpy(affine_field(np.hstack([rot, offset[:, None]]), (size, size))))
    return torch.stack(fields)


def window_margin(cfg: TrainConfig) -> int:
    """Pixels cut around a training crop so that its misalignment never pulls from outside the window."""
    return int(math.ceil(3 * cfg.shift + 3 * cfg.elastic + cfg.crop * math.radians(3 * cfg.rotation_deg) + 4))


class WindowSampler:
    """Draws training windows with exact target fields from aligned volumes."""

    def __init__(self, volumes: Sequence[np.ndarray], references: int, config: TrainConfig, seed: int):
        if not volumes:
            raise EmalignError("no training data: give --data stacks or --procedural N > 0")
        self.volumes = list(volumes)
        self.k = references
        self.cfg = config
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.margin = window_margin(config)
        big = config.crop + 2 * self.margin
        for v in self.volumes:
            if v.ndim != 3 or min(v.shape[1:]) < big or v.shape[0] < 2:
                raise EmalignError(f"training volume of shape {v.shape} is smaller than a {big} px window; use --crop")

    def _window(self, same_section: float, z_step: int | None) -> tuple[np.ndarray, bool]:
        vol = self.volumes[self.rng.integers(len(self.volumes))]
        symmetric = self.rng.random() < self.cfg.symmetric_fraction
        if z_step is None:
            z_step = 0 if self.rng.random() < same_section else int(self.rng.choice(self.cfg.z_steps))
        reach = (2 if symmetric else 1) * self.k * z_step
        while reach >= vol.shape[0]:
            z_step -= 1
            reach = (2 if symmetric else 1) * self.k * z_step
        offsets = np.arange(-self.k, self.k + 1) if symmetric else -np.abs(np.arange(-self.k, self.k + 1))
        low = self.k * z_step if symmetric else reach
        high = vol.shape[0] - (self.k * z_step if symmetric else 0)
        z0 = int(self.rng.integers(low, high)) if high > low else low
        big = self.cfg.crop + 2 * self.margin
        y0 = int(self.rng.integers(0, vol.shape[1] - big + 1))
        x0 = int(self.rng.integers(0, vol.shape[2] - big + 1))
        window = vol[z0 + offsets * z_step, y0 : y0 + big, x0 : x0 + big].astype(np.float32)
        window = np.rot90(window, int(self.rng.integers(4)), axes=(1, 2))
        if self.rng.random() < 0.5:
            window = window[:, :, ::-1]
        return np.ascontiguousarray(window), symmetric

    def sample(
        self, batch: int, same_section: float = 0.0, z_step: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(stack (B, D, H, W), target (B, 2, H, W), mask (B, H, W))``, stack normalised."""
        cfg, k, gen = self.cfg, self.k, self.gen
        windows, weights, mirrored = [], [], []
        for _ in range(batch):
            window, symmetric = self._window(same_section, z_step)
            windows.append(window)
            weights.append(reference_weights(k, symmetric))
            mirrored.append(not symmetric)
        true = torch.from_numpy(np.stack(windows)) / 255.0
        b, d, big, _ = true.shape
        lengths = torch.empty(b).uniform_(*cfg.elastic_length, generator=gen)
        amplitude = torch.rand(b, generator=gen) * cfg.elastic * 1.5
        move = compose_torch(
            random_rigid(b, big, cfg.shift, cfg.rotation_deg, cfg.scale, gen),
            smooth_noise(b, big, amplitude, lengths, gen),
        )
        jitter = smooth_noise(b * d, big, torch.full((b * d,), cfg.reference_jitter), torch.full((b * d,), 80.0), gen)
        jitter = jitter.view(b, d, 2, big, big)
        jitter[:, k] = 0
        for i in np.flatnonzero(mirrored):  # a mirrored slot shows the same section as its twin
            jitter[i, k + 1 :] = jitter[i, :k].flip(0)
        raw = warp_torch(true.reshape(b * d, 1, big, big), jitter.reshape(b * d, 2, big, big)).view(b, d, big, big)
        raw[:, k] = warp_torch(true[:, k : k + 1], move)[:, 0]
        weights = np.stack(weights)
        for i in np.flatnonzero(self.rng.random(b) < cfg.blank_reference):  # a lost section among the references
            slot = int(self.rng.choice([s for s in range(d) if s != k]))
            twins = [slot, 2 * k - slot] if mirrored[i] else [slot]
            raw[i, twins] = 0
            weights[i, twins] = 0
            weights[i] /= weights[i].sum()
        frame = (torch.from_numpy(weights).float().view(b, d, 1, 1, 1) * jitter).sum(1)
        target = compose_torch(invert_torch(move), frame)
        m = self.margin
        raw, target = raw[..., m:-m, m:-m], target[..., m:-m, m:-m]
        raw = self._augment_intensity(raw)
        mask = warp_torch(raw[:, k : k + 1].ne(0).float(), target)[:, 0] > 0.5
        return normalize_sections(raw), target, mask

    def _augment_intensity(self, raw: torch.Tensor) -> torch.Tensor:
        """Per-section gain, offset, gamma and noise; zero (no-data) pixels stay zero."""
        gen = self.gen
        b, d = raw.shape[:2]
        valid = raw.ne(0).float()
        gamma = torch.empty(b, d, 1, 1).uniform_(0.7, 1.4, generator=gen)
        gain = torch.empty(b, d, 1, 1).uniform_(0.7, 1.3, generator=gen)
        noise = torch.empty(b, d, 1, 1).uniform_(0.0, 0.08, generator=gen)
        out = raw.clamp_min(1e-4) ** gamma * gain + noise * torch.randn(raw.shape, generator=gen)
        return out.clamp(1e-3, 1.0) * valid


@contextlib.contextmanager
def encoder_outputs(model: FAEMReg) -> Iterator[list[torch.Tensor]]:
    """Collects the outputs of ``model``'s encoder levels (finest first) during the forward passes in the block."""
    outputs: list[torch.Tensor] = []
    handles = [stage.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for stage in model.encoder]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def distillation_loss(
    teacher: FAEMReg, stack: torch.Tensor, pred: torch.Tensor, features: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """End-point error of the student's field ``pred`` to the teacher's on ``stack (N, D, H, W)``, plus the mean
    squared difference of the channel-normalised encoder ``features`` (the student's, finest level first) and the
    teacher's at the levels where the shapes agree."""
    with torch.no_grad(), encoder_outputs(teacher) as guide_features:
        guide = teacher(stack)
    loss = endpoint_error(pred, guide, mask)
    for mine, theirs in zip(features, guide_features, strict=False):
        if mine.shape == theirs.shape:
            diff = F.normalize(mine, dim=1) - F.normalize(theirs, dim=1)
            loss = loss + diff.square().sum(1).mean()
    return loss


def training_loss(
    model: FAEMReg,
    stack: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainConfig,
    teacher: FAEMReg | None = None,
) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the supervised field error, reference similarity, smoothness and (with a
    ``teacher``) distillation."""
    with encoder_outputs(model) if teacher is not None else contextlib.nullcontext([]) as features:
        pred = model(stack)
    terms = {"epe": endpoint_error(pred, target, mask)}
    loss = cfg.supervised_weight * terms["epe"]
    if cfg.similarity_weight:
        k = model.config.references
        warped = warp_torch(stack[:, k : k + 1], pred)[:, 0]
        refs = torch.stack([stack[:, k - d] for d in range(1, k + 1)], 1)
        terms["ncc"] = reference_similarity(warped, refs, mask=mask.float())
        loss = loss + cfg.similarity_weight * terms["ncc"]
    terms["smooth"] = smoothness(pred)
    loss = loss + cfg.smooth_weight * terms["smooth"]
    if teacher is not None:
        terms["distill"] = distillation_loss(teacher, stack, pred, features, mask)
        loss = loss + cfg.distill_weight * terms["distill"]
    return loss, terms


@torch.no_grad()
def validate(model: FAEMReg, batches: Sequence[tuple[torch.Tensor, ...]], device: torch.device) -> dict:
    """Mean end-point error (px) of the model and of no correction on fixed windows."""
    model.eval()
    errors, baseline = [], []
    for stack, target, mask in batches:
        with autocast(device):
            pred = model(stack.to(device)).float().cpu()
        errors.append(float(endpoint_error(pred, target, mask)))
        baseline.append(float(endpoint_error(torch.zeros_like(target), target, mask)))
    model.train()
    return {"val_epe": float(np.mean(errors)), "val_epe_identity": float(np.mean(baseline))}


def warm_start(student: FAEMReg, teacher: FAEMReg) -> int:
    """Copy the teacher's tensors into the student wherever names and shapes agree; returns how many."""
    theirs = teacher.state_dict()
    shared = {key: value for key, value in student.state_dict().items() if key in theirs}
    copied = {key: theirs[key] for key, value in shared.items() if theirs[key].shape == value.shape}
    student.load_state_dict(copied, strict=False)
    return len(copied)


def _initial_model(cfg: TrainConfig, teacher: FAEMReg | None) -> FAEMReg:
    name = cfg.model
    if name in models.CONFIGS and not Path(name).exists():
        model = models.build(name)
        if teacher is not None:
            warm_start(model, teacher)
        return model
    return models.load(name).train()


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = True,
    progress: bool = True,
    volumes: Sequence[np.ndarray] = (),
    val_volumes: Sequence[np.ndarray] = (),
) -> dict:
    """Train (or fine-tune) a serial network; checkpoints ``last.pt`` and ``best.pt`` in ``out``.

    ``volumes`` / ``val_volumes``: aligned ``(Z, Y, X)`` arrays used besides ``cfg.data`` /
    instead of ``cfg.val_data`` (test-time adaptation passes the stack being aligned).
    Returns the validation history ``{"steps": [...], "val_epe": [...], ...}``.
    """
    opened = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmalignError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        reuse_freed_memory()
    torch.manual_seed(cfg.seed)
    teacher = models.load(cfg.teacher, device).requires_grad_(False) if cfg.teacher else None
    model = _initial_model(cfg, teacher).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    history: dict = {"steps": [], "val_epe": [], "val_epe_identity": [], "loss": []}
    start, best = 0, math.inf
    last = out / "last.pt"
    budget = 60.0 * cfg.minutes
    if resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["state"])
        opt.load_state_dict(ckpt["optimizer"])
        start, best, history = ckpt["step"], ckpt["best"], ckpt["history"]
        if budget and start >= CALIBRATION_STEPS:  # fitted before this checkpoint: keep its schedule
            cfg, budget = replace(cfg, steps=ckpt["train"]["steps"]), 0.0
    train_volumes = (
        [load_volume(p) for p in cfg.data]
        + list(volumes)
        + procedural_volumes(cfg.procedural, cfg.procedural_shape, cfg.seed)
    )
    val_volumes = (
        list(val_volumes)
        or [load_volume(p) for p in cfg.val_data]
        or procedural_volumes(1, cfg.procedural_shape, cfg.seed + 1000)
    )
    k = model.config.references
    sampler = WindowSampler(train_volumes, k, cfg, seed=cfg.seed + start)
    val_sampler = WindowSampler(val_volumes, k, cfg, seed=12345)
    val_batches = [
        val_sampler.sample(min(8, cfg.val_windows), z_step=cfg.val_z_step) for _ in range(max(1, cfg.val_windows // 8))
    ]

    def cosine(step: int) -> float:  # of the absolute step, so a resumed run continues the same schedule
        return 0.5 * (1 + math.cos(math.pi * min(step + start, cfg.steps) / max(cfg.steps, 1))) * 0.95 + 0.05

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    model.train()
    bar = tqdm(initial=start, total=cfg.steps, desc="train", disable=not progress)
    running = []
    started = time.time()
    step = start
    while step < cfg.steps:
        if budget and step == start + CALIBRATION_STEPS:
            remaining = budget - (time.time() - opened)
            cfg = replace(cfg, steps=step + steps_that_fit(step - start, time.time() - started, remaining))
            bar.total = cfg.steps
            bar.refresh()
        frac = step / max(cfg.steps - 1, 1)
        same = cfg.same_section_start + (cfg.same_section_end - cfg.same_section_start) * min(1.0, 2 * frac)
        stack, target, mask = sampler.sample(cfg.batch, same_section=same)
        with autocast(device):
            loss, terms = training_loss(model, stack.to(device), target.to(device), mask.to(device), cfg, teacher)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        scaler.step(opt)
        scaler.update()
        schedule.step()
        running.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(running[-20:]):.3f}", epe=f"{terms['epe'].item():.2f}")
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            metrics = validate(model, val_batches, device)
            history["steps"].append(step + 1)
            history["loss"].append(float(np.mean(running[-cfg.val_every :])))
            for key, value in metrics.items():
                history[key].append(value)
            extra = {"train": cfg.to_dict(), "step": step + 1, "history": history}
            if metrics["val_epe"] < best:
                best = metrics["val_epe"]
                models.save_checkpoint(out / "best.pt", model.cpu(), **extra, best=best)
                model.to(device)
            models.save_checkpoint(last, model.cpu(), **extra, best=best, optimizer=opt.state_dict())
            model.to(device)
            bar.write(
                f"step {step + 1}: val epe {metrics['val_epe']:.3f} px "
                f"(no correction {metrics['val_epe_identity']:.3f} px), {time.time() - started:.0f} s"
            )
        step += 1
        bar.update()
    bar.close()
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return history
