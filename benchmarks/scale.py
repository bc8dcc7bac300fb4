"""Accuracy along the axes on which real serial-section stacks differ (EVALUATION.md, "Realistic cases").

    python benchmarks/scale.py [--quick] [--seeds 3] [--stacks flyem-4nm,size-1024] [--misalignments a,c]
                               [--texture procedural|flyem] [--methods "no alignment,emalign align"] [--no-harm]

One run over a matrix of (stack, misalignment), six tables, four each varying one axis:

- **pixel size**: FlyEM sample 2, every 4th slice (40 nm), 32 sections at 10 nm pixels and zoomed
  (cubic, section by section) 2x and 2.5x to 5 and 4 nm pixels (250, 500, 625 px wide);
- **section size**: 448^2 (32 sections), 1024^2 (16), 2048^2 (6), 4096^2 (4, 2 seeds) of the procedural
  texture (`synth.em_texture`, z_step 4); sizes above 1024 tile a 1024^2 block section by
  section, so memory stays small (`--texture flyem`: FlyEM sections tiled instead);
- **misalignment**: (a) shifts 15 px, rotations 1 deg, scale 1 %, elastic 2 px at 100 px (as in
  benchmarks/accuracy.py); (b) (a) with 1.5 % isotropic scale and 2.5 % compression along a random direction
  per section; (c) shifts 100 px, rotations 4 deg (standard deviations per section): all three on the
  1024^2 texture, (a) and (b) on FlyEM 10 nm, (b) on FlyEM 5 nm (100 px would be 40 % of its sections);
- **issue 24's must-show cases**: (d) 15 px, 1 deg, 1 % scale, 2 % compression and (e) the same with 50 px and
  3 deg (30 and 100 px at 5 nm) on a 5 nm FlyEM stack of 12 x 1000^2 (a 2 x 2 mosaic of four 40 nm series,
  samples 1 and 2 as imaged and resliced along y, zoomed 2x: the volume is only 250 px wide, and a periodic
  tiling makes 100 px shifts ambiguous), the same mosaic at 10 nm (12 x 500^2, not zoomed: the same case in
  nm), and the 1024^2 texture under (a) and (f), (a) without its scale;
- **wander-free references**: the FlyEM volume resliced along y and along x (sections across the
  FIB-SEM slices, every 4th: 40 nm), which carry no slice-to-slice jitter of the microscope, beside the
  FlyEM stack as imaged;
- **large sections, large offsets, strain**: (g) shifts 400 px, rotations 3 deg, 1 % scale, 3 % compression and
  (h) 400 px, 4 deg, 2 % scale, 4 % compression on 12 x 4096^2 of the texture, a 2 x 2 mosaic of four volumes (not
  in `--quick`), so that an offset of a tenth of the width is not ambiguous (a tiled texture repeats every 1024 px);
  2 seeds at most. Matched at 2048^2 block means, as every section of 4096 px or more is, a few % of strain
  decorrelates the sections' edges (the prealignment's second opinions go down to 512 px).

Every misalignment is the same in nm: lengths (shift, elastic amplitude and correlation length) are given
at 10 nm and scaled by 10 / pixel nm. Each (stack, misalignment) is aligned by the pairwise-rigid chain, by
the anchor (the rigid chain, then SOFIMA's flow and elastic mesh: with its notebook's settings, and with a
softer mesh and laxer flow checks; where SOFIMA is installed) and by `emalign align` over several misalignment
seeds (mean and range); every stack is also fed in
aligned and unchanged (do no harm, once; ``--no-harm`` skips it, ``--methods`` picks methods). The input TIFF
carries the true voxel size (ImageJ calibration, `evaluate.pipeline_aligner(voxel_size=)`); a pipeline that
does not use it yet aligns 4 nm pixels with its 10 nm defaults. Metrics are measured on the interior pixels each
raw section imaged (`metrics.imaged`: a 100 px shift leaves part of the frame without data, where there is nothing
to align), in px of the stack (mean and range)
and in nm (mean); fail % counts residuals above 250 nm (25 px at 10 nm); s/MPx is each method's wall time per
megapixel of input (the small stacks of --quick pay mostly the pipeline's fixed start-up). Writes
benchmarks/results/scale.md; prints each row as it comes and the tables at the end. Needs ../shared/data.

Cost: each method aligns 1894 MPx over the default matrix, 1007 of them the 12 x 4096^2 mosaic (30 MPx with --quick;
printed at the start). At the 0.47 / 0.70 MPx/s of `emalign align` / the rigid chain on an idle 2-core EPYC
(benchmarks/results/speed_epyc.md) that is about 115 min, plus misalignment and metrics: about 130-140 min
(`--stacks` without `mosaic-4096`: 887 MPx, 60-70 min). Peak memory: 1.7 GB for 2 x 2048^2, 6.0 GB for 2 x 4096^2
(the rigid chain's full-resolution phase correlation and the (Z, 2, Y, X) fields), about 8 GB on 4 x 4096^2 and
more on the 12 x 4096^2 mosaic, whose true and estimated fields alone take 1.6 GB each. SOFIMA on this CPU (jax) takes
about 6 s/MPx on 1024^2 sections, 15 on the 5 nm mosaic and 40-50 on 250^2 (its compilations dominate there),
2.5-30x emalign's time on the same stacks, for each of its two rows.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emalign import evaluate, synth

RESULTS = Path(__file__).parent / "results"
SPACING_NM = 40.0
"""Section spacing of every stack (FlyEM every 4th slice; the texture's z_step 4), nm."""
REFERENCE_NM = 10.0
"""Pixel size at which the misalignments' lengths are given, nm."""
FAIL_NM = 250.0
"""A residual above this fails (25 px at 10 nm, as in :func:`emalign.metrics.alignment_metrics`)."""
TILE = 1024
"""Largest procedural texture generated in one piece; larger sections tile it."""
METRICS = ("rms", "adj", "drift")
SOFIMA = "rigid chain + SOFIMA flow + elastic mesh"
"""The anchor of EVALUATION.md (:func:`emalign.evaluate.sofima_chain`, its notebook's settings)."""
SOFIMA_TUNED = "rigid chain + SOFIMA with a softer mesh (k0 1; peaks 1.1)"
"""The anchor with the settings that did best on one seed of the 5 nm mosaic and the 1024^2 texture."""
NO_ALIGNMENT, RIGID_CHAIN, EMALIGN = "no alignment", "pairwise-rigid chain", "emalign align"
METHODS = (NO_ALIGNMENT, RIGID_CHAIN, SOFIMA, SOFIMA_TUNED, EMALIGN)
"""Every method's name, as the tables and ``--methods`` give it."""

MISALIGNMENTS = {
    "a": ("(a) 15 px, 1 deg, 1 % scale", {"shift": 15.0, "rotation_deg": 1.0, "scale": 0.01}),
    "b": (
        "(b) 15 px, 1 deg, 1.5 % scale, 2.5 % compression",
        {"shift": 15.0, "rotation_deg": 1.0, "scale": 0.015, "compression": 0.025},
    ),
    "c": ("(c) 100 px, 4 deg, 1 % scale", {"shift": 100.0, "rotation_deg": 4.0, "scale": 0.01}),
    "d": (
        "(d) 15 px, 1 deg, 1 % scale, 2 % compression",
        {"shift": 15.0, "rotation_deg": 1.0, "scale": 0.01, "compression": 0.02},
    ),
    "e": (
        "(e) 50 px, 3 deg, 1 % scale, 2 % compression",
        {"shift": 50.0, "rotation_deg": 3.0, "scale": 0.01, "compression": 0.02},
    ),
    "f": ("(f) 15 px, 1 deg, no scale", {"shift": 15.0, "rotation_deg": 1.0, "scale": 0.0}),
    "g": (
        "(g) 400 px, 3 deg, 1 % scale, 3 % compression",
        {"shift": 400.0, "rotation_deg": 3.0, "scale": 0.01, "compression": 0.03},
    ),
    "h": (
        "(h) 400 px, 4 deg, 2 % scale, 4 % compression",
        {"shift": 400.0, "rotation_deg": 4.0, "scale": 0.02, "compression": 0.04},
    ),
}
"""Name: (label at 10 nm, :func:`emalign.synth.misalign` arguments); all with elastic 2 px at 100 px."""
ELASTIC = {"elastic": 2.0, "elastic_length": 100.0}
LENGTHS = ("shift", "elastic", "elastic_length")


@dataclass(frozen=True)
class Stack:
    """An aligned reference stack of the matrix, made on demand by ``load``."""

    title: str
    pixel_nm: float
    shape: tuple[int, int, int]
    load: Callable[[], np.ndarray]
    seeds: int | None = None
    """At most this many misalignment seeds (the largest stacks); None: as many as asked."""


@dataclass(frozen=True)
class Plan:
    """Sizes of the matrix: FlyEM sections (and crop), texture sizes with their sections and seed cap."""

    flyem_sections: int
    flyem_crop: int | None
    sizes: dict[int, tuple[int, int | None]]
    wide: int
    """Section size of the misalignment axis."""
    seeds: int
    fine_sections: int
    """Sections of the 5 nm FlyEM mosaic (issue 24's must-show case)."""
    strained: tuple[int, int] | None
    """Side and sections of the texture mosaic that takes offsets of a tenth of its width under (g); None: none."""


FULL = Plan(32, None, {448: (32, None), 1024: (16, None), 2048: (6, None), 4096: (4, 2)}, 1024, 3, 12, (4096, 12))
QUICK = Plan(6, 128, {256: (6, None), 512: (4, None)}, 512, 2, 6, None)


def physical(misalignment: dict, pixel_nm: float) -> dict:
    """``misalignment`` (lengths in px at :data:`REFERENCE_NM`) in px of a stack with ``pixel_nm`` pixels."""
    factor = REFERENCE_NM / pixel_nm
    return {key: value * factor if key in LENGTHS else value for key, value in (ELASTIC | misalignment).items()}


def crop(stack: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size`` x ``size`` of every section (all of it for None)."""
    if size is None:
        return stack
    top, left = (stack.shape[1] - size) // 2, (stack.shape[2] - size) // 2
    return stack[:, top : top + size, left : left + size]


def zoomed(stack: np.ndarray, factor: float) -> np.ndarray:
    """Every section zoomed by ``factor`` (cubic), uint8: finer pixels of the same content."""
    from scipy import ndimage

    if factor == 1:
        return stack
    return np.stack(
        [
            np.clip(
                np.round(ndimage.zoom(s.astype(np.float32), factor, order=3, grid_mode=True, mode="reflect")), 0, 255
            )
            for s in stack
        ]
    ).astype(np.uint8)


def tiled(stack: np.ndarray, size: int) -> np.ndarray:
    """Every section (at most ``size`` px wide) tiled periodically about its centre to ``size`` x ``size`` (mirrored
    tiles would give the spectrum a mirror symmetry that makes the rotation search ambiguous)."""
    out = np.empty((len(stack), size, size), stack.dtype)
    for z, section in enumerate(stack):
        out[z] = np.pad(section, [((size - n) // 2, size - n - (size - n) // 2) for n in section.shape], "wrap")
    return out


def flyem(plan: Plan, pixel_nm: float = REFERENCE_NM, reslice: str = "") -> np.ndarray:
    """FlyEM sample 2 at 40 nm spacing, resliced across the FIB-SEM slices along ``reslice`` (``"y"``/``"x"``)
    or as imaged (``""``), zoomed to ``pixel_nm`` pixels."""
    volume = evaluate.shared_stack(evaluate.FLYEM[1])
    volume = {"": volume, "y": volume.transpose(1, 0, 2), "x": volume.transpose(2, 0, 1)}[reslice]
    stack = crop(volume[:: int(SPACING_NM / REFERENCE_NM)][: plan.flyem_sections], plan.flyem_crop)
    return zoomed(np.ascontiguousarray(stack), REFERENCE_NM / pixel_nm)


def texture(size: int, sections: int, kind: str) -> np.ndarray:
    """A ``sections`` x ``size`` x ``size`` stack at 10 nm pixels and 40 nm spacing: the procedural texture
    (generated up to :data:`TILE` px, tiled beyond) or FlyEM sections tiled."""
    if kind == "flyem":
        block = evaluate.shared_stack(evaluate.FLYEM[1], int(SPACING_NM / REFERENCE_NM), sections)
    else:
        side = min(size, TILE)
        block = synth.em_texture((sections, side, side), seed=0, z_step=SPACING_NM / REFERENCE_NM)
    return tiled(block, size)


def two_by_two(quarters: list[np.ndarray]) -> np.ndarray:
    """Four ``(Z, Y, X)`` stacks of one shape laid out as one ``(Z, 2 Y, 2 X)`` mosaic, the first two on top."""
    return np.concatenate([np.concatenate(quarters[:2], axis=2), np.concatenate(quarters[2:], axis=2)], axis=1)


def texture_mosaic(side: int, sections: int) -> np.ndarray:
    """``sections`` x ``side`` x ``side`` of the procedural texture at 10 nm pixels and 40 nm spacing, a 2 x 2 mosaic of
    four volumes (seeds 1-4): wide sections without the period of :func:`tiled`, which makes offsets of a tenth of
    the width ambiguous."""
    half = side // 2
    z_step = SPACING_NM / REFERENCE_NM
    return two_by_two([synth.em_texture((sections, half, half), seed=seed, z_step=z_step) for seed in (1, 2, 3, 4)])


def mosaic_flyem(plan: Plan, sections: int, pixel_nm: float = 5.0) -> np.ndarray:
    """``sections`` x ``2 side`` x ``2 side`` sections (``side``: the FlyEM crop, 250) zoomed to ``pixel_nm`` pixels: a
    2 x 2 mosaic of four different 40 nm series at 10 nm (FlyEM samples 1 and 2, as imaged and resliced along y). Wider
    sections than the volume's without the periodic content of :func:`tiled`, which makes large shifts ambiguous."""
    series = []
    for name in evaluate.FLYEM[::-1]:
        volume = evaluate.shared_stack(name)
        for view in (volume, volume.transpose(1, 0, 2)):
            series.append(crop(view[:: int(SPACING_NM / REFERENCE_NM)][:sections], plan.flyem_crop))
    return zoomed(two_by_two(series), REFERENCE_NM / pixel_nm)


def stacks(plan: Plan, kind: str = "procedural") -> dict[str, Stack]:
    """Every stack of the matrix by name."""
    n = plan.flyem_sections
    side = plan.flyem_crop or 250
    made = {}
    for pixel in (10.0, 5.0, 4.0):
        width = round(side * REFERENCE_NM / pixel)
        made[f"flyem-{pixel:g}nm"] = Stack(
            f"FlyEM, {n} x {width}^2, {pixel:g} nm px", pixel, (n, width, width), functools.partial(flyem, plan, pixel)
        )
    for pixel in (10.0, 5.0):
        width = round(2 * side * REFERENCE_NM / pixel)
        made[f"flyem-{pixel:g}nm-mosaic"] = Stack(
            f"FlyEM 2 x 2 mosaic, {plan.fine_sections} x {width}^2, {pixel:g} nm px",
            pixel,
            (plan.fine_sections, width, width),
            functools.partial(mosaic_flyem, plan, plan.fine_sections, pixel),
        )
    for axis in "yx":
        made[f"resliced-{axis}"] = Stack(
            f"FlyEM resliced along {axis} (wander-free), {n} x {side}^2, 10 nm px",
            REFERENCE_NM,
            (n, side, side),
            functools.partial(flyem, plan, reslice=axis),
        )
    if plan.strained:
        side, sections = plan.strained
        made[f"mosaic-{side}"] = Stack(
            f"procedural 2 x 2 mosaic, {sections} x {side}^2, 10 nm px",
            REFERENCE_NM,
            (sections, side, side),
            functools.partial(texture_mosaic, side, sections),
            2,
        )
    name = "procedural texture" if kind == "procedural" else "FlyEM tiled"
    for size, (sections, seeds) in plan.sizes.items():
        made[f"size-{size}"] = Stack(
            f"{name}, {sections} x {size}^2, 10 nm px",
            REFERENCE_NM,
            (sections, size, size),
            functools.partial(texture, size, sections, kind),
            seeds,
        )
    return made


def axes(plan: Plan) -> list[tuple[str, list[tuple[str, str]]]]:
    """The tables: (title, [(stack name, misalignment name)])."""
    return [
        ("Pixel size (misalignment the same in nm)", [(f"flyem-{p}nm", "a") for p in (10, 5, 4)]),
        ("Section size", [(f"size-{size}", "a") for size in plan.sizes]),
        (
            "Misalignment",
            [("flyem-10nm", "a"), ("flyem-10nm", "b"), ("flyem-5nm", "b")]
            + [(f"size-{plan.wide}", m) for m in MISALIGNMENTS if m not in "gh"],
        ),
        (
            "Issue 24's must-show cases (FlyEM mosaic at 5 nm and at 10 nm; procedural with and without scale)",
            [(f"flyem-{p}nm-mosaic", m) for p in (5, 10) for m in "de"] + [(f"size-{plan.wide}", m) for m in "af"],
        ),
        ("Wander-free references", [("flyem-10nm", "a"), ("resliced-y", "a"), ("resliced-x", "a")]),
        (
            "Large sections, offsets of a tenth of their width, strain",
            [(f"mosaic-{plan.strained[0]}", m) for m in "gh"] if plan.strained else [],
        ),
    ]


def run(
    stack: Stack, misalignments: list[str], seeds: int, chosen: set[str] | None = None, harm: bool = True
) -> dict[str, dict[str, list[dict]]]:
    """``{misalignment or "harm": {method: [metrics per seed]}}`` of one stack, with the ``chosen`` methods
    (default all), and the do-no-harm run unless ``harm`` is False."""
    aligned = stack.load()
    fail_px = FAIL_NM / stack.pixel_nm
    out: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        methods = {
            NO_ALIGNMENT: evaluate.no_alignment,
            RIGID_CHAIN: evaluate.rigid_chain_fields,
            SOFIMA: functools.partial(evaluate.sofima_chain, pixel_nm=stack.pixel_nm),
            SOFIMA_TUNED: functools.partial(evaluate.sofima_chain, pixel_nm=stack.pixel_nm, min_peak=1.1, k0=1.0),
            EMALIGN: evaluate.pipeline_aligner(tmp, voxel_size=(SPACING_NM, stack.pixel_nm, stack.pixel_nm)),
        }
        methods = {m: f for m, f in methods.items() if chosen is None or m in chosen}
        for name in misalignments:
            setting = physical(MISALIGNMENTS[name][1], stack.pixel_nm)
            runs = [
                evaluate.evaluate(aligned, methods, seed=seed, misalignment=setting, fail_px=fail_px)
                for seed in range(min(seeds, stack.seeds or seeds))
            ]
            out[name] = {method: [r[method] for r in runs] for method in methods}
        unchanged = {m: f for m, f in methods.items() if m != NO_ALIGNMENT}
        if harm and unchanged:
            results = evaluate.evaluate(aligned, unchanged, misalignment=evaluate.NO_MISALIGNMENT, fail_px=fail_px)
            out["harm"] = {method: [result] for method, result in results.items()}
    return out


def megapixels(everything: dict[str, Stack], todo: dict[str, list[str]], seeds: int, harm: bool = True) -> float:
    """MPx of input each method aligns over the stacks and misalignments in ``todo`` (plus do no harm unless
    ``harm`` is False)."""
    total = 0.0
    for name, misalignments in todo.items():
        stack = everything[name]
        runs = len(misalignments) * min(seeds, stack.seeds or seeds) + harm
        total += np.prod(stack.shape) / 1e6 * runs
    return total


def rows(stack: Stack, case: str, results: dict[str, list[dict]]) -> list[str]:
    """One Markdown row per method: mean (range) in px, means in nm, fail %, s/MPx."""
    lines = []
    for method, runs in results.items():
        px = [evaluate.mean_range([r[m] for r in runs]) for m in METRICS]
        nm = " / ".join(f"{np.mean([r[m] for r in runs]) * stack.pixel_nm:.0f}" for m in METRICS)
        fail = 100 * np.mean([r["fail"] for r in runs])
        s_per_mpx = np.mean([1 / r["mpx_per_s"] for r in runs])
        lines.append(
            f"| {stack.title} | {case} | {method} | {len(runs)} | {' | '.join(px)} | {nm} | {fail:.1f} | "
            f"{s_per_mpx:.2f} |"
        )
    return lines


HEADER = [
    "| stack | misalignment | method | seeds | rms px | adj px | drift px | rms / adj / drift nm | fail % | s/MPx |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def label(name: str, pixel_nm: float) -> str:
    """The misalignment's label (``"harm"``: the do-no-harm case), with its shift in px of the stack where that
    differs from 10 nm."""
    if name == "harm":
        return "none: aligned stack unchanged (do no harm)"
    text, setting = MISALIGNMENTS[name]
    if pixel_nm == REFERENCE_NM:
        return text
    return f"{text} at 10 nm ({physical(setting, pixel_nm)['shift']:g} px here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stacks (FlyEM 6 x 128^2, texture 256^2, 512^2)")
    parser.add_argument("--seeds", type=int, help="misalignments per case (seeds 0..N-1; default 3, --quick 2)")
    parser.add_argument("--stacks", help="comma-separated stack names (default all; see the tables)")
    parser.add_argument("--misalignments", default=",".join(MISALIGNMENTS), help="comma-separated subset")
    parser.add_argument("--methods", help="comma-separated subset of the methods (default all)")
    parser.add_argument("--no-harm", action="store_true", help="skip the do-no-harm runs")
    parser.add_argument("--texture", choices=("procedural", "flyem"), default="procedural")
    parser.add_argument("--out", default=str(RESULTS / "scale.md"))
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    seeds = args.seeds or plan.seeds
    everything = stacks(plan, args.texture)
    chosen = set(args.stacks.split(",")) if args.stacks else set(everything)
    unknown = chosen - set(everything)
    if unknown:
        parser.error(f"unknown stacks {sorted(unknown)}; choose from {list(everything)}")
    wanted = set(args.misalignments.split(","))
    methods = set(args.methods.split(",")) if args.methods else None
    if methods and methods - set(METHODS):
        parser.error(f"unknown methods {sorted(methods - set(METHODS))}; choose from {list(METHODS)}")
    if importlib.util.find_spec("sofima") is None:
        if methods and methods & {SOFIMA, SOFIMA_TUNED}:
            parser.error("the SOFIMA rows need SOFIMA: pip install git+https://github.com/google-research/sofima")
        methods = (methods or set(METHODS)) - {SOFIMA, SOFIMA_TUNED}
        print("SOFIMA is not installed: its rows are left out", flush=True)
    tables = [(title, [(s, m) for s, m in cases if s in chosen and m in wanted]) for title, cases in axes(plan)]
    todo: dict[str, list[str]] = {}
    for _, cases in tables:
        for name, misalignment in cases:
            todo.setdefault(name, [])
            if misalignment not in todo[name]:
                todo[name].append(misalignment)
    print(f"{megapixels(everything, todo, seeds, not args.no_harm):.0f} MPx of input per method", flush=True)
    start = time.perf_counter()
    done = {}
    for name, misalignments in todo.items():
        stack = everything[name]
        done[name] = run(stack, misalignments, seeds, methods, not args.no_harm)
        for key in [key for key in [*misalignments, "harm"] if key in done[name]]:
            print("\n".join(rows(stack, label(key, stack.pixel_nm), done[name][key])), flush=True)
    parts = [
        f"`python benchmarks/scale.py{' --quick' if args.quick else ''}`, {time.strftime('%Y-%m-%d')}: {seeds} "
        f"misalignment seeds, {time.perf_counter() - start:.0f} s in all. Metrics px (mean and range over the "
        f"seeds) and nm (mean); fail: residual above {FAIL_NM:g} nm; s/MPx: wall time per megapixel of input."
    ]
    for title, cases in tables:
        if not cases:
            continue
        lines = [f"## {title}", "", *HEADER]
        for name, misalignment in cases:
            stack = everything[name]
            lines += rows(stack, label(misalignment, stack.pixel_nm), done[name][misalignment])
        for name in [name for name in dict.fromkeys(name for name, _ in cases) if "harm" in done[name]]:
            lines += rows(everything[name], label("harm", everything[name].pixel_nm), done[name]["harm"])
        parts.append("\n".join(lines))
    text = "\n\n".join(parts) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print("\n" + text + f"written to {args.out}")


if __name__ == "__main__":
    main()
