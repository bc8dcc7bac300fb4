"""Stage 7: per-section quality table, a summary plot and a printed summary.

Columns of ``qc.csv``: ``z``, ``flags`` (blank/damaged/skipped), ``corr_before`` and
``corr_after`` (Pearson correlation with the previous section, on a grid of every 4th pixel, sparser on
sections over 8192 px, raw vs aligned), ``field_rms_px`` (RMS length of the section's global field),
``folding_pct`` (% of field grid points with Jacobian determinant <= 0).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from emalign.fields import folding_percent
from emalign.io import Stack, check_chunk
from emalign.metrics import adjacent_correlation
from emalign.pipeline.store import Workspace, flag_text

QC_STEP = 4
QC_SIDE = 2048
"""Most grid points a side the correlations are taken on: a section wider than ``QC_STEP * QC_SIDE`` px is sampled
more sparsely (:func:`sample_step`)."""
QC_BAND = 1 << 24
"""Raw pixels read at once, in a band of whole rows (:func:`sampled`)."""
COLUMNS = ("z", "flags", "corr_before", "corr_after", "field_rms_px", "folding_pct")


def _neighbour_correlation(sections) -> list[float]:
    """Correlation of each section with the previous one (NaN for the first), streaming."""
    values, previous = [], None
    for section in sections:
        values.append(np.nan if previous is None else float(adjacent_correlation(np.stack([previous, section]))[0]))
        previous = section
    return values


def sample_step(shape: tuple[int, ...]) -> int:
    """Step (px) of the QC grid over sections of ``shape`` (.., y, x): :data:`QC_STEP`, or more, so that the grid
    has at most :data:`QC_SIDE` points a side."""
    return max(QC_STEP, -(-max(shape[-2:]) // QC_SIDE))


def sampled(stack: Stack, z: int, step: int) -> np.ndarray:
    """Every ``step``-th pixel along y and x of section ``z`` of ``stack`` (as read), read in bands of whole rows of
    about :data:`QC_BAND` px, so that a large section is never held whole."""
    height, width = stack.shape[1:]
    rows = max(step, QC_BAND // width // step * step)
    columns = slice(0, width, step)
    bands = (slice(y, min(y + rows, height), step) for y in range(0, height, rows))
    return np.concatenate([check_chunk(stack, z, require_finite=False, region=(band, columns)) for band in bands])


def quality_table(ws: Workspace, stack: Stack) -> list[dict]:
    """The per-section QC rows (streams the full-resolution raw ``stack`` and the aligned one once, subsampled)."""
    depth = ws.plan.shape[0]
    aligned = ws.writer.arrays[0]
    flags = ws.flags()
    fields = ws.array("fields/global")
    step = sample_step(aligned.shape)
    before = _neighbour_correlation(sampled(stack, z, step) for z in range(depth))
    after = _neighbour_correlation(np.asarray(aligned[z, ::step, ::step]) for z in range(depth))
    rows = []
    for z in range(depth):
        field = np.asarray(fields[z])
        rows.append(
            {
                "z": z,
                "flags": flag_text(int(flags[z])),
                "corr_before": before[z],
                "corr_after": after[z],
                "field_rms_px": ws.factor * float(np.sqrt(np.mean(np.sum(field**2, 0)))),
                "folding_pct": folding_percent(field / ws.params.stride) if min(field.shape[1:]) > 1 else 0.0,
            }
        )
    return rows


def _temporary_name(path: Path) -> Path:
    """A temporary name next to ``path``: written there, then renamed, so a killed run leaves no torn file."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_table(rows: list[dict], path: Path) -> None:
    temporary = _temporary_name(path)
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()}
            )
    os.replace(temporary, path)


def plot(rows: list[dict], path: Path) -> None:
    """Two panels along z: neighbour correlation before/after, and field size with folding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = [r["z"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    top.plot(z, [r["corr_before"] for r in rows], label="raw", color="0.6")
    top.plot(z, [r["corr_after"] for r in rows], label="aligned", color="tab:blue")
    top.set_ylabel("corr. with previous")
    top.legend(loc="lower right")
    bottom.plot(z, [r["field_rms_px"] for r in rows], color="tab:orange")
    bottom.set_ylabel("field RMS (px)")
    bottom.set_xlabel("section z")
    for r in rows:
        if r["flags"]:
            for axis in (top, bottom):
                axis.axvline(r["z"], color="tab:red", alpha=0.3)
    fig.suptitle("emalign QC (red: flagged sections)")
    fig.tight_layout()
    temporary = _temporary_name(path)
    fig.savefig(temporary, dpi=90, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(temporary, path)


def _median(values: list[float]) -> float:
    """Median of the finite values; nan (without numpy's All-NaN warning) when there is none, e.g. one section."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.median(finite)) if finite else float("nan")


def summary(rows: list[dict]) -> str:
    """A few lines for the terminal."""
    before = _median([r["corr_before"] for r in rows])
    after = _median([r["corr_after"] for r in rows])
    flagged = [f"{r['z']} ({r['flags']})" for r in rows if r["flags"]]
    folding = max(r["folding_pct"] for r in rows)
    lines = [
        f"sections: {len(rows)}; flagged: {len(flagged)}" + (f" [{', '.join(flagged[:10])}]" if flagged else ""),
        f"median correlation with the previous section: {before:.3f} raw -> {after:.3f} aligned",
        f"largest folding: {folding:.2f}% of field grid points",
    ]
    return "\n".join(lines)


def run_qc(ws: Workspace, stack: Stack) -> str:
    """Write ``qc.csv`` and ``qc.png`` into the output; return the summary."""
    rows = quality_table(ws, stack)
    for name, write in (("qc.csv", write_table), ("qc.png", plot)):
        write(rows, ws.files / name)
        ws.publish(ws.files / name)
    done = ws.writer.done_sections()
    if done.all():
        return summary(rows)
    return (
        f"incomplete output: {int(done.sum())} of {done.size} sections rendered (the rest are zeros, "
        "their corr_after is nan); run `emalign align` again to finish\n" + summary(rows)
    )
