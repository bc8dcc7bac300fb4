"""Accuracy on EM stacks with known misalignment (EVALUATION.md), all methods in one run.

    pip install -e ".[bench]" && python benchmarks/accuracy.py [--model faemreg-small] [--quick]

Every table has two parts: the misaligned stack (shifts ~15 px, rotations ~1 deg, scale ~1 %,
elastic ~2 px at ~100 px) and the same stack left aligned ("do no harm": what each method
does to a stack that needs nothing). Prints Markdown tables and writes them to
benchmarks/results/accuracy.md, and a bar chart of every table to benchmarks/results/accuracy.png.
Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from emalign import evaluate
from emalign.pipeline import AlignParams

RESULTS = Path(__file__).parent / "results"
ARTIFACTS = ("blank", "low_contrast", "noisy")
CRACKS = ("crack",) * 3


ALL = ("none", "chain", "tvl1", "elastix", "sequential", "align", "fast")
FAST = ("none", "chain", "align")
FINE = (*ALL, "unpolished")
FINE_FAST = (*FAST, "unpolished")
"""At fine z-spacing ``--polish auto`` polishes; the unpolished pipeline shows what the polish stage adds."""
ADAPT_STEPS = 200
"""Test-time adaptation steps of the ``adapt`` row (on the stack the shipped model never saw)."""


def cases() -> list[tuple[str, np.ndarray, tuple[str, ...], tuple[str, ...]]]:
    """(title, aligned stack, artifacts, methods) of each benchmark stack.

    The slow baselines (TV-L1 and elastix chains, the paper's sequential inference) run on the two held-out
    FlyEM stacks; the other stacks compare emalign with the rigid chain.
    """
    sample1, sample2 = evaluate.FLYEM
    both = np.concatenate([evaluate.shared_stack(name, 4) for name in (sample1, sample2)])
    held_out = evaluate.shared_stack(sample2, 4)
    isbi = evaluate.isbi_reference()
    return [
        (f"FlyEM sample 2 (held out), 40 nm, {len(held_out)} sections", held_out, (), ALL),
        ("FlyEM sample 2, every slice (10 nm), 62 sections", evaluate.shared_stack(sample2, 1, 62), (), FINE),
        ("FlyEM sample 2, every 2nd slice (20 nm), 62 sections", evaluate.shared_stack(sample2, 2, 62), (), FINE_FAST),
        ("FlyEM sample 2, every 6th slice (60 nm), 42 sections", evaluate.shared_stack(sample2, 6), (), FAST),
        (
            f"FlyEM samples 1 + 2, every 4th slice (40 nm), {len(both)} sections (two blocks: one break)",
            both,
            (),
            ("none", "chain", "tvl1", "align"),
        ),
        (f"FlyEM sample 2, 40 nm, {len(held_out)} sections, blank + low-contrast + noisy", held_out, ARTIFACTS, FAST),
        (f"FlyEM sample 2, 40 nm, {len(held_out)} sections, 3 torn by a crack", held_out, CRACKS, FAST),
        (
            f"ISBI 2012 (ssTEM, 50 nm, never seen in training), 30 sections, its section jumps removed "
            f"(`evaluate.remove_section_offsets`: {isbi.shape[1]} x {isbi.shape[2]} px)",
            isbi,
            (),
            (*FAST, "adapt"),
        ),
    ]


def torn_table(stack: np.ndarray, aligners: dict, cracked: dict[str, dict]) -> str:
    """Each method's :func:`emalign.evaluate.torn_section_error` on the torn sections (from ``cracked``, the
    results with the cracks), and on the same sections of the same misaligned stack without them."""
    torn = next(iter(cracked.values()))["torn_sections"]
    intact = evaluate.evaluate(stack, aligners, watch=torn)
    lines = [
        f"Sections {', '.join(map(str, torn))} against their neighbours, px (residual minus the mean of the "
        "neighbours' residuals):",
        "",
        "| method | torn by a crack | intact |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {cracked[name]['torn_adj']:.2f} | {intact[name]['torn_adj']:.2f} |" for name in aligners]
    return "\n".join(lines)


def plot(cases: list[tuple[str, dict[str, dict]]], path: Path) -> None:
    """One panel per stack: rms / adj / drift of every method on the misaligned stack, and its rms on the
    aligned one (do no harm); ``cases`` holds (title, {method: metrics}) with the do-no-harm rows named
    ``"<method>, on the aligned stack (do no harm)"``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2 * len(cases)), squeeze=False)
    bars = (("rms", "rms", False), ("adj", "adj", False), ("drift", "drift", False), ("rms", "do no harm (rms)", True))
    for ax, (title, results) in zip(axes[:, 0], cases, strict=True):
        methods = [name for name in results if not name.endswith("(do no harm)") and name != "no alignment"]
        x = np.arange(len(methods))
        for i, (key, label, harm) in enumerate(bars):
            rows = [results.get(f"{m}, on the aligned stack (do no harm)", {}) if harm else results[m] for m in methods]
            ax.bar(x + (i - 1.5) * 0.2, [row.get(key, np.nan) for row in rows], 0.2, label=label)
        ax.set_xticks(x, [textwrap.fill(m.removeprefix("emalign ").split(" (")[0], 24) for m in methods], fontsize=7)
        ax.set_ylabel("px")
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="faemreg-small")
    parser.add_argument("--quick", action="store_true", help="only the first case")
    parser.add_argument("--out", default=str(RESULTS / "accuracy.md"))
    args = parser.parse_args()
    tables, plotted = [], []
    with tempfile.TemporaryDirectory() as tmp:
        aligners = {
            "none": ("no alignment", evaluate.no_alignment),
            "chain": ("pairwise-rigid chain", evaluate.rigid_chain_fields),
            "tvl1": ("rigid chain + TV-L1 flow chain (scikit-image)", evaluate.tvl1_chain),
            "elastix": ("rigid chain + elastix B-spline chain (itk-elastix)", evaluate.elastix_chain),
            "sequential": (
                f"emalign {args.model}, sequential (paper inference, leashed, 3 passes)",
                evaluate.emalign_aligner("sequential", args.model),
            ),
            "align": (
                f"emalign {args.model}, `emalign align`",
                evaluate.pipeline_aligner(tmp, AlignParams(model=args.model)),
            ),
            "fast": (
                "emalign faemreg-fast (distilled student), `emalign align --model faemreg-fast`",
                evaluate.pipeline_aligner(tmp, AlignParams(model="faemreg-fast")),
            ),
            "adapt": (
                f"emalign {args.model}, `emalign align --adapt {ADAPT_STEPS}`",
                evaluate.pipeline_aligner(tmp, AlignParams(model=args.model, adapt=ADAPT_STEPS)),
            ),
            "unpolished": (
                f"emalign {args.model}, `emalign align --polish off`",
                evaluate.pipeline_aligner(tmp, AlignParams(model=args.model, polish="off")),
            ),
        }
        for title, stack, artifacts, methods in cases()[: 1 if args.quick else None]:
            chosen = dict(aligners[m] for m in methods)
            results = evaluate.evaluate(stack, chosen, artifacts=artifacts)
            unchanged = evaluate.evaluate(stack, chosen, misalignment=evaluate.NO_MISALIGNMENT)
            results |= {f"{name}, on the aligned stack (do no harm)": r for name, r in unchanged.items()}
            table = evaluate.markdown_table(results, title)
            if "crack" in artifacts:
                table += "\n\n" + torn_table(stack, chosen, results)
            print(table + "\n", flush=True)
            tables.append(table)
            plotted.append((title, results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n\n".join(tables) + "\n")
    plot(plotted, Path(args.out).with_suffix(".png"))
    print(f"written to {args.out} and {Path(args.out).with_suffix('.png')}")


if __name__ == "__main__":
    main()
