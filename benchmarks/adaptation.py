"""What test-time adaptation can gain on the stack the shipped model never saw, and why so little.

    python benchmarks/adaptation.py [--seeds 3] [--steps 200]

On the ISBI 2012 stack (ssTEM, 50 nm sections, 4 nm pixels; its section jumps removed as in
benchmarks/accuracy.py), over several misalignments: `emalign align`, `emalign align --adapt N`, and the
shipped model fine-tuned with the adaptation's own recipe on the *aligned reference itself* (the
sample adaptation would see if the base model aligned it perfectly: the most that fine-tuning on
synthetic targets from this stack can teach). A second table splits the residual of `emalign align`
(interior, shared field removed) into each section's translation, the rest of its best-fit affine
map (rotation, scale, shear) and the non-affine rest, beside the same split of the misalignment
itself and of what `emalign align` does to the aligned stack: the network's share is the part a
fine-tune can change. Writes benchmarks/results/adaptation.md. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from seeds import summary_rows

from emalign import evaluate, metrics, synth
from emalign.pipeline import AlignParams
from emalign.pipeline.adapt import adaptation_config
from emalign.train import train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="misalignments (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=200, help="adaptation steps")
    parser.add_argument("--out", default=str(RESULTS / "adaptation.md"))
    args = parser.parse_args()
    isbi = evaluate.isbi_reference()
    lines = [
        f"ISBI 2012, 50 nm, {len(isbi)} sections, {args.seeds} misalignments (rms / adj / drift px, mean and range):",
        "",
        "| stack | method | count | rms | adj | drift |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        ceiling = Path(tmp) / "ceiling"
        cfg = adaptation_config("faemreg-small", args.steps, isbi.shape)
        train(cfg, ceiling, resume=False, progress=False, volumes=[isbi], val_volumes=[isbi])
        align = evaluate.pipeline_aligner(Path(tmp) / "align")
        methods = {
            "emalign align": align,
            f"emalign align --adapt {args.steps}": evaluate.pipeline_aligner(
                Path(tmp) / "adapt", AlignParams(adapt=args.steps)
            ),
            f"fine-tuned {args.steps} steps on the aligned reference itself": evaluate.pipeline_aligner(
                Path(tmp) / "ceiling-align", AlignParams(model=str(ceiling / "best.pt"))
            ),
        }
        lines += summary_rows("ISBI 2012", [isbi], methods, args.seeds)
        case = synth.misalign(isbi, seed=0)
        splits = {
            "the misalignment itself": case.fields,
            "emalign align's residual": metrics.residual_fields(case.fields, align(case.stack)),
            "emalign align on the aligned stack": align(isbi),
        }
    lines += [
        "",
        "Where the residual lies (seed 0; px RMS):",
        "",
        "| field | translation | linear (rotation, scale, shear) | non-affine |",
        "|---|---|---|---|",
    ]
    for name, field in splits.items():
        parts = metrics.residual_parts(field)
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in parts.values()) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text + f"written to {args.out}")


if __name__ == "__main__":
    main()
