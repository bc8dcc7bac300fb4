"""What a serial model's field answers to: its gain on the moving section and the frame of references it aligns to.

    python benchmarks/response.py [--models faemreg-small,faemreg-fast] [--spacings 1,4,6] [--windows 24]

The stitch (:mod:`emalign.consensus`) reads the network's field of section ``z`` as ``u_z = c_z - sum_d w_d c_{z+d}``,
with FAEMReg's distance weights ``w`` (:data:`emalign.consensus.PAPER_REFERENCE_WEIGHTS`, nearest largest). This
measures what a trained model does instead. Windows of ``2K + 1`` aligned FlyEM sections (sample 2, held out of
training; every ``--spacings``-th slice of 10 nm) get a known field per section: a smooth random field (``--elastic``
px RMS, correlation length ``--length`` px) or a linear one (``--linear`` per Jacobian entry). The network's field,
smoothed as the pipeline smooths it (``--smoothing`` px), is fitted by least squares, per pixel of the interior,
to ``sum_s a_s f_s`` over the window's slots ``s``. The table gives the fitted gain (the moving slot's ``a``), the
frame the references' ``a`` imply (``-a`` averaged over both sides, normalised to sum 1 over the distances; the
stitch assumes 0.55 / 0.27 / 0.18), and the RMS misfit of the fit and of the stitch's model, beside the RMS of what
the stitch's model says the field should be. Writes benchmarks/results/response.md. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from emalign import evaluate, models, synth
from emalign.consensus import reference_weights
from emalign.fields import affine_field, invert, warp
from emalign.inference import predict_windows

RESULTS = Path(__file__).parent / "results"
MARGIN = 0.15
"""Share of each side left out of the fit (the network's field is least sure at the sections' edges)."""
SUBSAMPLE = 4
"""Fit every this many pixels (the smoothed fields vary slowly)."""


def section_field(shape: tuple[int, int], kind: str, args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """A known ``(2, Y, X)`` pull field of one section: smooth random (``"elastic"``) or linear about the centre."""
    if kind == "elastic":
        return synth.random_smooth_field(shape, args.elastic, args.length, rng)
    jac = rng.normal(0.0, args.linear, (2, 2))
    centre = (np.asarray(shape) - 1) / 2
    return affine_field(np.hstack([np.eye(2) + jac, (-jac @ centre)[:, None]]), shape)


def window_samples(
    model: models.FAEMReg, stack: np.ndarray, kind: str, args: argparse.Namespace, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(P, 2K + 1)`` known fields per slot and ``(P,)`` the network's field, over interior pixels of all windows."""
    k = model.config.references
    shape = stack.shape[1:]
    inner = tuple(slice(int(MARGIN * n), n - int(MARGIN * n), SUBSAMPLE) for n in shape)
    known, answered = [], []
    for centre in rng.choice(np.arange(k, len(stack) - k), args.windows):
        fields = np.stack([section_field(shape, kind, args, rng) for _ in range(2 * k + 1)])
        window = np.stack(
            [warp(section, invert(f)) for section, f in zip(stack[centre - k : centre + k + 1], fields, strict=True)]
        )
        field = predict_windows(model, window[None].astype(np.float32), torch.device("cpu"))[0]
        field = ndimage.gaussian_filter(field, (0, args.smoothing, args.smoothing), mode="nearest")
        known.append(fields[:, :, inner[0], inner[1]].reshape(2 * k + 1, -1).T)
        answered.append(field[:, inner[0], inner[1]].reshape(-1))
    return np.concatenate(known), np.concatenate(answered)


def response_row(known: np.ndarray, answered: np.ndarray, references: int) -> dict:
    """The least-squares response of ``answered`` to ``known`` (see the module doc) and the misfits."""
    fitted = np.linalg.lstsq(known, answered, rcond=None)[0]
    assumed = -reference_weights(references, symmetric=True)
    assumed[references] = 1.0
    sides = -(fitted[references - 1 :: -1] + fitted[references + 1 :]) / 2
    return {
        "gain": fitted[references],
        "frame": sides / sides.sum(),
        "misfit": float(np.sqrt(np.mean((answered - known @ fitted) ** 2))),
        "stitch_misfit": float(np.sqrt(np.mean((answered - known @ assumed) ** 2))),
        "signal": float(np.sqrt(np.mean((known @ assumed) ** 2))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="faemreg-small,faemreg-fast", help="shipped names or .pt checkpoints")
    parser.add_argument("--spacings", default="1,4,6", help="z-steps in slices of 10 nm")
    parser.add_argument("--windows", type=int, default=24, help="windows per model, spacing and field kind")
    parser.add_argument("--elastic", type=float, default=2.0, help="RMS of each section's smooth field, px")
    parser.add_argument("--length", type=float, default=100.0, help="its correlation length, px")
    parser.add_argument("--linear", type=float, default=0.01, help="SD of each Jacobian entry of a linear field")
    parser.add_argument("--smoothing", type=float, default=16.0, help="Gaussian sigma on the network's field, px")
    parser.add_argument("--out", default=str(RESULTS / "response.md"))
    args = parser.parse_args()
    lines = [
        f"`python benchmarks/response.py --models {args.models} --spacings {args.spacings} --windows {args.windows}` "
        f"(elastic {args.elastic:g} px at {args.length:g} px, linear {args.linear:g}, smoothing {args.smoothing:g} px)",
        "",
        "| model | spacing | field | gain | frame, distance 1 / 2 / 3 | misfit px: fitted / stitch's | signal px |",
        "|---|---|---|---|---|---|---|",
    ]
    steps = [int(s) for s in args.spacings.split(",")]
    stacks = {step: evaluate.shared_stack(evaluate.FLYEM[1], step).astype(np.float32) for step in steps}
    for name in args.models.split(","):
        model = models.load(name)
        for step, stack in stacks.items():
            for kind in ("elastic", "linear"):
                rng = np.random.default_rng(step)
                row = response_row(*window_samples(model, stack, kind, args, rng), model.config.references)
                frame = " / ".join(f"{w:.2f}" for w in row["frame"])
                lines.append(
                    f"| {name} | {10 * step} nm | {kind} | {row['gain']:.2f} | {frame} | "
                    f"{row['misfit']:.2f} / {row['stitch_misfit']:.2f} | {row['signal']:.2f} |"
                )
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
