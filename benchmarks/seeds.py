"""How much the accuracy numbers depend on the one misalignment of the main benchmark.

    python benchmarks/seeds.py [--seeds 4] [--spacings 1,2,4,6]

For every z-spacing (every slice = 10 nm), both FlyEM stacks are misaligned with several random
seeds (as in benchmarks/accuracy.py: shifts ~15 px, rotations ~1 deg, scale ~1 %, elastic ~2 px)
and aligned by the pairwise-rigid chain and by `emalign align`; the table gives the mean and the
range of rms / adj / drift over those stacks. Writes benchmarks/results/seeds.md. Needs
../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from emalign import evaluate

RESULTS = Path(__file__).parent / "results"
METRICS = ("rms", "adj", "drift")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="misalignments per stack (seeds 0..N-1)")
    parser.add_argument("--spacings", default="1,2,4,6", help="z-steps in slices of 10 nm")
    parser.add_argument("--out", default=str(RESULTS / "seeds.md"))
    args = parser.parse_args()
    lines = [
        "| spacing | method | stacks | rms mean (range) | adj mean (range) | drift mean (range) |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        methods = {"pairwise-rigid chain": evaluate.rigid_chain, "emalign align": evaluate.pipeline_aligner(tmp)}
        for step in (int(s) for s in args.spacings.split(",")):
            stacks = [evaluate.shared_stack(name, step, 63 if step == 4 else 62) for name in evaluate.FLYEM]
            scores: dict[str, list[list[float]]] = {name: [] for name in methods}
            for stack in stacks:
                for seed in range(args.seeds):
                    for name, result in evaluate.evaluate(stack, methods, seed=seed).items():
                        scores[name].append([result[m] for m in METRICS])
            for name, values in scores.items():
                table = np.array(values)
                cells = [f"{c.mean():.2f} ({c.min():.2f}-{c.max():.2f})" for c in table.T]
                lines.append(f"| {10 * step} nm | {name} | {len(table)} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text + f"written to {args.out}")


if __name__ == "__main__":
    main()
