"""A larger serial network trained on a GPU in a few minutes, measured against the shipped faemreg-small.

    python benchmarks/gpu_train.py [--model faemreg-wide] [--minutes 4] [--seeds 2] [--weights faemreg-wide.pt]
    python benchmarks/gpu_train.py --device cpu --minutes 0.3 --batch 2 --crop 64 --sections 10 --seeds 1  # on a CPU

Trains ``--model`` from scratch on FlyEM sample 1 in the two stages of faemreg-small's model card, compressed into
``--minutes`` of wall-clock time (``emalign train --minutes``; 60 % and 40 % of it): stage 1 with the default recipe
(same-section windows early, lr 1e-3), stage 2 on the pipeline's task (symmetric windows, smaller residual motion,
each reference warped by its own 1.2 px field, lr 3e-4), each keeping its best checkpoint on held-out sample 2
windows at 40 nm. Then it aligns FlyEM sample 2 at 40 and 10 nm with ``emalign align`` on the device, the shipped
faemreg-small and the new weights on the same ``--seeds`` misalignments and on the aligned stacks (do no harm), and
writes a Markdown table (saved after each part); the new weights go to ``--weights``. Needs ../shared/data (or
``--data-dir``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from emalign import evaluate, models
from emalign.device import describe, resolve_device
from emalign.pipeline import AlignParams
from emalign.shared_data import FLYEM, SHARED_DATA, shared_stack
from emalign.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
STAGES = (
    ("from scratch", 0.6, {}),
    (
        "the pipeline's task",
        0.4,
        {
            "same_section_start": 0.0,
            "same_section_end": 0.0,
            "symmetric_fraction": 0.75,
            "shift": 1.5,
            "rotation_deg": 0.3,
            "reference_jitter": 1.2,
            "lr": 3e-4,
        },
    ),
)
"""(name, share of the minutes, TrainConfig changes) of each training stage; each starts from the last's best."""
SHIPPED = "faemreg-small"
STACKS = (("40 nm", 4, None), ("10 nm", 1, 62))
"""(name, z-step, sections) of the FlyEM sample 2 stacks the two models align, as in benchmarks/accuracy.py."""


def train_stages(cfg: TrainConfig, minutes: float, out: Path) -> tuple[Path, list[str]]:
    """Runs :data:`STAGES` from ``cfg`` within ``minutes``; the last stage's best checkpoint and a line per stage."""
    model, notes = cfg.model, []
    for number, (name, share, changes) in enumerate(STAGES, 1):
        stage_dir = out / f"stage{number}"
        started = time.perf_counter()
        history = train(
            replace(cfg, model=model, minutes=share * minutes, **changes), stage_dir, resume=False, progress=False
        )
        model = str(stage_dir / "best.pt")
        best = min(history["val_epe"])
        notes.append(
            f"stage {number} ({name}): {history['steps'][-1]} steps in {time.perf_counter() - started:.0f} s, "
            f"best validation end-point error {best:.3f} px (no correction {history['val_epe_identity'][-1]:.3f})"
        )
        print(notes[-1], flush=True)
    return Path(model), notes


def compare(weights: Path, data_dir: Path, sections: int | None, seeds: int, device: str, tmp: Path) -> list[str]:
    """Table rows: each of :data:`STACKS` aligned by the shipped model and by ``weights``, mean (range) over ``seeds``
    misalignments, and how far each moves the aligned stack."""
    aligners = {
        name: evaluate.pipeline_aligner(tmp / name, AlignParams(model=model), device=device)
        for name, model in ((SHIPPED, SHIPPED), (weights.stem, str(weights)))
    }
    rows = []
    for label, z_step, count in STACKS:
        limit = min(filter(None, (count, sections)), default=None)
        stack = shared_stack(FLYEM[1], z_step, limit, data_dir=data_dir)
        runs = [evaluate.evaluate(stack, aligners, seed=seed) for seed in range(seeds)]
        unmoved = evaluate.evaluate(stack, aligners, misalignment=evaluate.NO_MISALIGNMENT)
        for name, cells in evaluate.seed_cells(runs).items():
            seconds = sum(run[name]["seconds"] for run in runs) / seeds
            rows.append(
                f"| {label}, {len(stack)} sections | {name} | {' | '.join(cells)} | {unmoved[name]['rms']:.2f} | "
                f"{seconds:.1f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="faemreg-wide", help="architecture to train (emalign.models.CONFIGS)")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time, all stages")
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--crop", type=int, default=144, help="training crop, px")
    parser.add_argument("--seeds", type=int, default=2, help="misalignments of each benchmark stack")
    parser.add_argument("--sections", type=int, default=0, help="benchmark stacks cut to this many sections (0: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    parser.add_argument("--data-dir", default=str(SHARED_DATA), help="folder of the FlyEM stacks")
    parser.add_argument("--weights", default="", help="where the new weights go (default: beside --out)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_train.md"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    data_dir = Path(args.data_dir)
    sample1, sample2 = (str(data_dir / name) for name in FLYEM)
    weights = Path(args.weights or Path(args.out).with_name(f"{args.model}.pt"))
    cfg = TrainConfig(
        model=args.model,
        data=(sample1,),
        val_data=(sample2,),
        batch=args.batch,
        crop=args.crop,
        val_every=250,
        device=str(device),
    )
    parameters = sum(p.numel() for p in models.build(args.model).parameters())
    lines = [
        f"{args.model} ({parameters / 1e6:.2f} M parameters) trained on {describe(device)}; "
        f"{time.strftime('%Y-%m-%d')}; batch {args.batch}, crop {args.crop}, {args.minutes:g} minutes",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        best, notes = train_stages(cfg, args.minutes, tmp / "train")
        weights.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, weights)
        lines += [*(f"- {note}" for note in notes), "", f"Weights: `{weights.name}`.", ""]
        evaluate.print_and_save("\n".join(lines), args.out)
        lines += [
            f"FlyEM sample 2, `emalign align --device {device.type}`, px, mean (range) over {args.seeds} "
            "misalignment(s); do no harm: the aligned stack fed in (rms):",
            "",
            "| stack | model | rms | adj | drift | do no harm | s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *compare(weights, data_dir, args.sections or None, args.seeds, str(device), tmp),
        ]
        evaluate.print_and_save("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
