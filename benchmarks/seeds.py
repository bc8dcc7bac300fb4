"""How much the accuracy numbers depend on the one misalignment of the main benchmark.

    python benchmarks/seeds.py [--seeds 4] [--spacings 1,2,4,6] [--isbi-adapt 200]

For every z-spacing (every slice = 10 nm), both FlyEM stacks are misaligned with several random
seeds (as in benchmarks/accuracy.py: shifts ~15 px, rotations ~1 deg, scale ~1 %, elastic ~2 px)
and aligned by the pairwise-rigid chain and by `emalign align`; the table gives the mean and the
range of rms / adj / drift over those stacks. With ``--isbi-adapt N`` the ISBI 2012 stack (never
seen in training; its section jumps removed as in benchmarks/accuracy.py) gets the same treatment,
with `emalign align --adapt N` beside the other two. Writes benchmarks/results/seeds.md. Needs
../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from emalign import evaluate
from emalign.pipeline import AlignParams

RESULTS = Path(__file__).parent / "results"
METRICS = ("rms", "adj", "drift")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="misalignments per stack (seeds 0..N-1)")
    parser.add_argument("--spacings", default="1,2,4,6", help="z-steps in slices of 10 nm")
    parser.add_argument("--isbi-adapt", type=int, default=0, help="also the ISBI stack, with --adapt N (0: skip)")
    parser.add_argument("--out", default=str(RESULTS / "seeds.md"))
    args = parser.parse_args()
    lines = [
        "| stacks | method | count | rms mean (range) | adj mean (range) | drift mean (range) |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        methods = {"pairwise-rigid chain": evaluate.rigid_chain_fields, "emalign align": evaluate.pipeline_aligner(tmp)}
        for step in (int(s) for s in args.spacings.split(",")):
            stacks = [evaluate.shared_stack(name, step, 63 if step == 4 else 62) for name in evaluate.FLYEM]
            lines += summary_rows(f"FlyEM {10 * step} nm", stacks, methods, args.seeds)
        if args.isbi_adapt:
            methods[f"emalign align --adapt {args.isbi_adapt}"] = evaluate.pipeline_aligner(
                tmp, AlignParams(adapt=args.isbi_adapt)
            )
            isbi = evaluate.isbi_reference()
            lines += summary_rows("ISBI 2012, 50 nm", [isbi], methods, args.seeds)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text + f"written to {args.out}")


def summary_rows(label: str, stacks: list[np.ndarray], methods: dict, seeds: int) -> list[str]:
    """One Markdown row per method: mean and range of each metric over ``seeds`` misalignments of every stack."""
    scores: dict[str, list[list[float]]] = {name: [] for name in methods}
    for stack in stacks:
        for seed in range(seeds):
            for name, result in evaluate.evaluate(stack, methods, seed=seed).items():
                scores[name].append([result[m] for m in METRICS])
    rows = []
    for name, values in scores.items():
        table = np.array(values)
        cells = [evaluate.mean_range(c) for c in table.T]
        rows.append(f"| {label} | {name} | {len(table)} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
