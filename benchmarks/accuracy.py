"""Accuracy on FlyEM stacks with known misalignment (EVALUATION.md), all methods in one run.

    python benchmarks/accuracy.py [--model faemreg-small] [--sections 63] [--quick]

Prints Markdown tables and writes them to benchmarks/results/accuracy.md. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from emalign import evaluate
from emalign.pipeline import AlignParams

RESULTS = Path(__file__).parent / "results"


def cases(sections: int) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(title, file, z-step, artifacts) of each benchmark stack."""
    sample2 = evaluate.FLYEM[1]
    return [
        (f"FlyEM sample 2, every 4th slice (40 nm), {sections} sections", sample2, 4, ()),
        (f"FlyEM sample 2, every slice (10 nm), {sections} sections", sample2, 1, ()),
        (f"FlyEM sample 2, 40 nm, {sections} sections, with artifacts", sample2, 4, ("blank", "low_contrast", "noisy")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="faemreg-small")
    parser.add_argument("--sections", type=int, default=62)
    parser.add_argument("--quick", action="store_true", help="only the first case")
    parser.add_argument("--out", default=str(RESULTS / "accuracy.md"))
    args = parser.parse_args()
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, name, step, artifacts in cases(args.sections)[: 1 if args.quick else None]:
            stack = evaluate.shared_stack(name, step, args.sections)
            aligners = {
                "no alignment": evaluate.no_alignment,
                "pairwise-rigid chain": evaluate.rigid_chain,
                f"emalign {args.model}, sequential (paper inference)": evaluate.emalign_aligner(
                    "sequential", args.model
                ),
                f"emalign {args.model}, pipeline (stitched)": evaluate.pipeline_aligner(
                    tmp, AlignParams(model=args.model)
                ),
            }
            table = evaluate.markdown_table(evaluate.evaluate(stack, aligners, artifacts=artifacts), title)
            print(table + "\n", flush=True)
            tables.append(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n\n".join(tables) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
