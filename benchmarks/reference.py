"""How aligned are the benchmark's aligned references, as image matching sees them?

    pip install -e ".[bench]" && python benchmarks/reference.py

The accuracy benchmarks misalign an aligned stack and charge every aligner for any difference from
it, so a wander that image matching sees in the reference itself is a floor under the drift and rms
of any aligner that reads neighbour similarity. This feeds each *aligned* reference, unchanged, to
three aligners: the pairwise-rigid chain, a robust rigid solve over redundant pairs
(translation only, full resolution; pairs up to 8 sections apart at 10 nm, up to 3 at wider spacing,
where sections further apart share no content), and `emalign align`. For each it reports the
wander it applies (the ``drift`` of EVALUATION.md: RMS over z of the per-section mean translation,
common offset and linear trend removed) and how alike the methods' wanders are (correlation of
their per-section translations). At 10 nm the same solve on each quadrant of the
sections on its own splits the wander into the part shared by the whole section (a frame drift) and
the local rest (content that moves, or warps); at wider spacing a quadrant's matches are too weak for
that (its solve wanders by 4-20 px) and the split is left out.

A second table bounds the drift of any aligner that keeps a curvature-penalised z-trend (as emalign's
prealignment and refine stages do, so that an aligned stack with oblique content comes out unchanged). With
trend stiffness ``s`` it keeps the trend of the benchmark misalignment's own per-section translations
(independent per section, yet over a stack of 30-63 sections their Whittaker trend is not zero: the *leak*, RMS over
:data:`MISALIGNMENTS` misalignments), and it corrects the part of the reference's wander (as the robust solve
sees it) that the trend does not follow (*moved*). Even with every section matched exactly as the matchers
match it, its drift is about ``hypot(leak, moved)`` at the best stiffness. Writes
benchmarks/results/reference.md. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from emalign import evaluate, metrics, rigid, synth
from emalign.consensus import smooth_trend

RESULTS = Path(__file__).parent / "results"
FINE = (1, 2, 3, 4, 6, 8)
"""Pair offsets of the robust solve at 10 nm."""
WIDE = (1, 2, 3)
"""Pair offsets of the robust solve at 40-50 nm."""
STIFFNESSES = (1e3, 1e4, 1e5, 1e6)
"""Trend stiffnesses of the drift-floor table (emalign's default ``--trend-stiffness`` is 1e4)."""
MISALIGNMENTS = 8
"""Misalignments (seeds 0..7, the accuracy benchmark's kind) over which the trend's leak is averaged."""


def robust_solve(stack: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """Pull fields ``(Z, 2, Y, X)`` of a robust translation-only solve over pairs ``offsets`` apart."""
    pairs = rigid.pairwise_rigid(stack, offsets, downsample=1, max_rotation_deg=0)
    return rigid.affine_fields(rigid.solve_rigid(len(stack), pairs, stack.shape[1:]), stack.shape[1:])


def wander(fields: np.ndarray) -> np.ndarray:
    """``(Z, 2)`` px: per-section mean translation of ``fields (Z, 2, Y, X)`` over the metrics' interior, with
    the common offset and the linear trend along z removed (what the ``drift`` metric sees)."""
    means = metrics.interior(np.asarray(fields, np.float64)).mean(axis=(2, 3))
    z = np.arange(len(means), dtype=float)
    design = np.stack([np.ones_like(z), z], axis=1)
    return means - design @ np.linalg.lstsq(design, means, rcond=None)[0]


def rms(series: np.ndarray) -> float:
    """RMS length of ``(..., Z, 2)`` translation vectors."""
    return float(np.sqrt((series**2).sum(-1).mean()))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two wanders (both components together)."""
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def quadrant_split(stack: np.ndarray, offsets: tuple[int, ...]) -> tuple[float, float]:
    """``(shared, local)`` px: RMS of the mean of the four quadrants' :func:`robust_solve` wanders, and of each
    quadrant's difference from that mean."""
    half_y, half_x = stack.shape[1] // 2, stack.shape[2] // 2
    quadrants = np.array(
        [
            wander(robust_solve(stack[:, y : y + half_y, x : x + half_x], offsets))
            for y in (0, half_y)
            for x in (0, half_x)
        ]
    )
    shared = quadrants.mean(axis=0)
    return rms(shared), rms(quadrants - shared)


def trend_floor(stack: np.ndarray, reference_wander: np.ndarray) -> list[tuple[float, float]]:
    """``(leak, moved)`` px per stiffness of :data:`STIFFNESSES`: RMS over :data:`MISALIGNMENTS` misalignments of
    ``stack`` of the trend of their :func:`wander`, and the RMS of ``reference_wander`` minus its trend."""
    misaligned = [wander(synth.misalign(stack, seed=seed).fields) for seed in range(MISALIGNMENTS)]
    return [
        (
            float(np.sqrt(np.mean([rms(smooth_trend(m, stiffness)) ** 2 for m in misaligned]))),
            rms(reference_wander - smooth_trend(reference_wander, stiffness)),
        )
        for stiffness in STIFFNESSES
    ]


def references() -> list[tuple[str, np.ndarray, tuple[int, ...]]]:
    """(title, aligned stack, pair offsets of the robust solve) of the accuracy benchmark's references."""
    sample1, sample2 = evaluate.FLYEM
    isbi = evaluate.isbi_reference()
    return [
        ("FlyEM sample 1, 10 nm, 62 sections", evaluate.shared_stack(sample1, 1, 62), FINE),
        ("FlyEM sample 2, 10 nm, 62 sections", evaluate.shared_stack(sample2, 1, 62), FINE),
        ("FlyEM sample 1, 40 nm, 63 sections", evaluate.shared_stack(sample1, 4), WIDE),
        ("FlyEM sample 2, 40 nm, 63 sections", evaluate.shared_stack(sample2, 4), WIDE),
        ("ISBI 2012, 50 nm, 30 sections (section jumps removed)", isbi, WIDE),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "reference.md"))
    args = parser.parse_args()
    lines = [
        "| reference (aligned, unchanged) | rigid chain wander | robust solve wander | emalign align wander "
        "| corr emalign / chain | corr emalign / solve | shared by the quadrants | local |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floors = [
        "| reference | " + " | ".join(f"stiffness {s:.0e}: leak / moved -> floor" for s in STIFFNESSES) + " | lowest |",
        "|---|" + "---|" * (len(STIFFNESSES) + 1),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        emalign = evaluate.pipeline_aligner(tmp)
        for title, stack, offsets in references():
            chain, solve, ours = (
                wander(f) for f in (evaluate.rigid_chain_fields(stack), robust_solve(stack, offsets), emalign(stack))
            )
            similar = [correlation(ours, chain), correlation(ours, solve)]
            cells = [f"{c:.2f}" for c in (rms(chain), rms(solve), rms(ours), *similar)]
            cells += [f"{c:.2f}" for c in quadrant_split(stack, offsets)] if offsets == FINE else ["-", "-"]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            bounds = [(leak, moved, float(np.hypot(leak, moved))) for leak, moved in trend_floor(stack, solve)]
            cells = [f"{leak:.2f} / {moved:.2f} -> {floor:.2f}" for leak, moved, floor in bounds]
            floors.append(f"| {title} | " + " | ".join(cells) + f" | {min(b[2] for b in bounds):.2f} |")
            print(floors[-1], flush=True)
    text = "\n".join(lines) + "\n\nDrift floor of a trend-keeping aligner (px):\n\n" + "\n".join(floors) + "\n"
    Path(args.out).write_text(text)
    print(text + f"written to {args.out}")


if __name__ == "__main__":
    main()
