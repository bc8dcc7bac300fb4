"""Volumetric registration on held-out FlyEM pairs with known smooth 3D deformations.

    python benchmarks/volumetric.py [--pairs 6] [--size 64] [--quick]

Pairs are cut from FlyEM sample 2 (never seen in training) and deformed by random affine + elastic
fields (emalign.volumetric.data.make_pair), so the true pull field is known. For each method:
residual field error (mean end-point error to the true field, voxels, 4 voxels at each face left
out), folding (% of voxels with det J <= 0), time and peak memory of one registration (CPU, one
thread, each method in a fresh process: peak resident memory above the process's level before the
call). CRD's student is also given as a fraction of its teacher's time and memory. A second table
gives the cost of the papers' configurations (untrained; parameters, time, memory).

Prints Markdown and writes benchmarks/results/volumetric.md. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MARGIN = 4
SHIPPED = ("sdhnet-small", "rdn-small", "crd-small", "crd-teacher-small")
PAPER = ("sdhnet-paper", "rdn-paper", "crd-paper", "crd-teacher-paper")


def held_out_pairs(count: int, size: int, seed: int = 2024):
    from emalign.volumetric import data

    volume = data.normalise(data.flyem_volume(1))
    return data.make_pairs(volume, count, size, seed, data.DeformationSpec())


def endpoint(field: np.ndarray, truth: np.ndarray) -> float:
    inner = (slice(None), *[slice(MARGIN, -MARGIN)] * 3)
    return float(np.sqrt(((field - truth)[inner] ** 2).sum(0)).mean())


def oracle_affine(truth: np.ndarray) -> np.ndarray:
    """The least-squares affine fit to the true field: the best any affine method could do."""
    shape = truth.shape[1:]
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")).reshape(3, -1)
    design = np.concatenate([coords, np.ones((1, coords.shape[1]))]).T
    coef, *_ = np.linalg.lstsq(design, truth.reshape(3, -1).T, rcond=None)
    return (design @ coef).T.reshape(truth.shape).astype(np.float32)


def method_field(method: str, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """The pull field of ``method``: ``affine``, a model name, or ``affine+<model>``."""
    from emalign.volumetric import infer
    from emalign.volumetric.affine import affine_register

    if method == "affine":
        return affine_register(fixed, moving)[1]
    affine = method.startswith("affine+")
    name = method.removeprefix("affine+")
    prealign = infer.fit_affine(fixed, moving) if affine else None
    from emalign import volumetric

    return infer.predict_field(
        volumetric.load(name), fixed, moving, patch=fixed.shape[0], device="cpu", affine=prealign
    )


def _memory() -> tuple[int, int]:
    """(current, peak) resident memory of this process in KiB, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def measure(method: str, size: int, repeats: int) -> dict:
    """Time and peak memory of one registration of a ``size``^3 pair (run in a fresh process)."""
    import torch

    torch.set_num_threads(1)
    from emalign import volumetric
    from emalign.volumetric import infer
    from emalign.volumetric.affine import affine_register

    pair = held_out_pairs(1, size, seed=7)[0]
    if method == "affine":
        run = lambda: affine_register(pair.fixed, pair.moving)  # noqa: E731
    else:
        shipped = (volumetric.WEIGHTS_DIR / f"{method}.pt").exists()
        model = volumetric.load(method) if shipped else volumetric.build(method).eval()
        run = lambda: infer.predict_field(model, pair.fixed, pair.moving, patch=size, device="cpu")  # noqa: E731
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        resettable = True
    except OSError:
        resettable = False
    before, _ = _memory()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    _, peak = _memory()
    return {"seconds": float(np.median(times)), "peak_mib": (peak - before) / 1024 if resettable else float("nan")}


def measure_in_subprocess(method: str, size: int, repeats: int = 3) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", method, "--size", str(size), "--repeats", str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="2 pairs, no paper-configuration table")
    parser.add_argument("--crd-size", type=int, default=128, help="second pair size for CRD student vs teacher")
    parser.add_argument("--out", default=str(RESULTS / "volumetric.md"))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.size, args.repeats)))
        return

    import torch

    torch.set_num_threads(1)
    from emalign import fields, volumetric

    pairs = held_out_pairs(2 if args.quick else args.pairs, args.size)
    methods = ["affine"] + [m for name in SHIPPED for m in (name, f"affine+{name}")]
    errors: dict[str, list[float]] = {"no registration": [], "best affine (oracle)": []}
    folding: dict[str, list[float]] = {}
    for pair in pairs:
        errors["no registration"].append(endpoint(np.zeros_like(pair.field), pair.field))
        errors["best affine (oracle)"].append(endpoint(oracle_affine(pair.field), pair.field))
        for method in methods:
            field = method_field(method, pair.fixed, pair.moving)
            errors.setdefault(method, []).append(endpoint(field, pair.field))
            folding.setdefault(method, []).append(fields.folding_percent(field))
    cost = {m: measure_in_subprocess(m, args.size) for m in ["affine", *SHIPPED]}
    truth_fold = float(np.mean([fields.folding_percent(p.field) for p in pairs]))

    lines = [
        f"Held-out FlyEM sample 2: {len(pairs)} pairs of {args.size}^3 voxels (10 nm), true fields affine "
        "(shift 2 vox, rotation 2 deg, scale 2 % s.d.) + elastic (2 vox RMS, correlation 14 vox), "
        f"mean |true field| {np.mean(errors['no registration']):.2f} vox, true fields fold at {truth_fold:.3f} %. "
        f"Time and peak memory: one {args.size}^3 registration, CPU, 1 thread (network forward or affine fit).",
        "",
        "| method | params | residual error (vox) | folding % | time s | peak MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("no registration", "best affine (oracle)"):
        lines.append(f"| {name} | | {np.mean(errors[name]):.2f} | 0 | | |")
    for method in methods:
        name = method.removeprefix("affine+")
        params = "" if method == "affine" else f"{volumetric.build(name).parameter_count() / 1e6:.2f} M"
        c = cost["affine" if method == "affine" else name]
        timing = f"{c['seconds']:.2f}" + (f" + {cost['affine']['seconds']:.2f}" if method.startswith("affine+") else "")
        label = {"affine": "affine (classical, global NCC)"}.get(method, method.replace("+", " + "))
        lines.append(
            f"| {label} | {params} | {np.mean(errors[method]):.2f} | {np.mean(folding[method]):.3f} "
            f"| {timing} | {c['peak_mib']:.0f} |"
        )
    teacher, student = cost["crd-teacher-small"], cost["crd-small"]
    big_teacher = measure_in_subprocess("crd-teacher-small", args.crd_size)
    big_student = measure_in_subprocess("crd-small", args.crd_size)
    lines += [
        "",
        "CRD student (crd-small) vs its feature-shifted teacher (crd-teacher-small), time and peak memory as a "
        "fraction of the teacher's:",
        "",
        "| pair | student s | teacher s | time | student MiB | teacher MiB | memory |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, (st, te) in ((args.size, (student, teacher)), (args.crd_size, (big_student, big_teacher))):
        lines.append(
            f"| {size}^3 | {st['seconds']:.2f} | {te['seconds']:.2f} | {100 * st['seconds'] / te['seconds']:.0f} % "
            f"| {st['peak_mib']:.0f} | {te['peak_mib']:.0f} | {100 * st['peak_mib'] / te['peak_mib']:.0f} % |"
        )
    if not args.quick:
        lines += [
            "",
            f"Papers' configurations (untrained), one {args.size}^3 pair, CPU, 1 thread:",
            "",
            "| configuration | params | paper | time s | peak MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        paper_cost = {m: measure_in_subprocess(m, args.size, 1) for m in PAPER}
        for name in PAPER:
            count = volumetric.build(name).parameter_count()
            c = paper_cost[name]
            ref = volumetric.PAPER_PARAMETERS[name]
            lines.append(
                f"| {name} | {count / 1e6:.2f} M | {ref / 1e6:.2f} M | {c['seconds']:.2f} | {c['peak_mib']:.0f} |"
            )
        t, s = paper_cost["crd-teacher-paper"], paper_cost["crd-paper"]
        lines += [
            "",
            f"crd-paper student vs teacher: time {100 * s['seconds'] / t['seconds']:.0f} %, "
            f"peak memory {100 * s['peak_mib'] / t['peak_mib']:.0f} %.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
