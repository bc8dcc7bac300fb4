"""Accuracy against known ground truth (EVALUATION.md): misalign an aligned stack, align it
with several methods, and measure the residual fields.

Used by ``emalign demo``, the benchmarks and the tests; the metric itself lives in
:mod:`emalign.metrics`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from emalign import metrics, rigid, synth
from emalign.register import full_resolution_fields, register_sections
from emalign.shared_data import FLYEM, ISBI, SHARED_DATA, shared_stack

NO_MISALIGNMENT = {"shift": 0.0, "rotation_deg": 0.0, "scale": 0.0, "elastic": 0.0}
"""``misalignment`` of :func:`evaluate` for the "do no harm" case: the aligned stack as it is."""

Aligner = Callable[[np.ndarray], np.ndarray]
"""Takes a misaligned ``(Z, Y, X)`` stack, returns ``(Z, 2, Y, X)`` pull fields."""


def best_offset(previous: np.ndarray, section: np.ndarray, search: int = 64) -> tuple[np.ndarray, float, float]:
    """Whole-pixel offset ``(dy, dx)`` of ``section``'s content from ``previous``'s, by brute-force NCC.

    Both are ``(Y, X)`` images of one shape. ``previous``'s centre (``search`` px cut on each side) is
    compared with every window of ``section`` within ``search`` px; ``section(p + offset) ~ previous(p)``.
    Returns the offset and the normalized cross-correlation there and at no offset (a large gain marks a
    section jump, not content change). Independent of emalign's own matching (the phase correlation of
    :mod:`emalign.rigid`), so a reference repaired with it does not favour the method under test.
    """
    from scipy import signal

    centre = previous[search:-search, search:-search].astype(np.float64)
    centre = (centre - centre.mean()) / max(float(centre.std()), 1e-12)
    image, ones = section.astype(np.float64), np.ones_like(centre)
    n = centre.size
    products = signal.fftconvolve(image, centre[::-1, ::-1], mode="valid")
    sums = signal.fftconvolve(image, ones, mode="valid") / n
    squares = signal.fftconvolve(image * image, ones, mode="valid") / n
    ncc = products / (n * np.sqrt(np.maximum(squares - sums**2, 1e-12)))
    peak = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return np.array(peak) - search, float(ncc[peak]), float(ncc[search, search])


def remove_section_offsets(stack: np.ndarray, search: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A reference stack rid of whole-pixel section jumps, cropped to the area every section covers.

    For stacks published as aligned that still hold section jumps (ISBI 2012: neighbours match best at
    offsets of up to 26 px per axis, their correlation rising from 0.06 to 0.27). A classic translation
    chain: each section's :func:`best_offset` from the one before it, chained, every section cut at its
    offset from the median one. Sub-pixel residue and slow wander stay; a benchmark's misaligned input
    keeps the wander too.

    Args:
        stack: ``(Z, Y, X)`` sections.
        search: largest offset searched between neighbours, px (per axis).

    Returns:
        The cropped ``(Z, Y', X')`` stack (input dtype) and the ``(Z, 2)`` int offsets removed.
    """
    stack = np.asarray(stack)
    steps = [np.zeros(2, np.int64)] + [best_offset(stack[z - 1], stack[z], search)[0] for z in range(1, len(stack))]
    offsets = np.cumsum(steps, axis=0)
    offsets -= np.round(np.median(offsets, axis=0)).astype(np.int64)
    low = offsets.min(axis=0)
    height, width = np.array(stack.shape[1:]) - (offsets.max(axis=0) - low)
    if height < 1 or width < 1:
        raise ValueError(f"the section offsets ({offsets.min(0)} to {offsets.max(0)} px) leave no common area")
    starts = offsets - low
    cropped = np.stack([section[y : y + height, x : x + width] for section, (y, x) in zip(stack, starts, strict=True)])
    return cropped, offsets


def isbi_reference(data_dir: Path | None = None) -> np.ndarray:
    """The ISBI 2012 stack from ../shared/data as the benchmarks' aligned reference: its whole-pixel section
    jumps removed (:func:`remove_section_offsets`), cropped to the area every section covers."""
    return remove_section_offsets(shared_stack(ISBI, data_dir=data_dir))[0]


def no_alignment(stack: np.ndarray) -> np.ndarray:
    """The identity: leaves the misaligned stack as it is."""
    return np.zeros((stack.shape[0], 2, *stack.shape[1:]), np.float32)


def rigid_chain_fields(stack: np.ndarray) -> np.ndarray:
    """The classic baseline as ``(Z, 2, Y, X)`` pull fields: :func:`emalign.rigid.rigid_chain`'s affines, sampled."""
    return rigid.affine_fields(rigid.rigid_chain(stack), stack.shape[1:])


def _elastic_chain(stack: np.ndarray, register: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """The rigid chain, then each prealigned section pulled onto the previous aligned one by
    ``register(fixed, moving) -> (2, Y, X)`` pull field (intensities scaled to [0, 1]), chained."""
    from emalign.fields import compose, warp

    coarse = rigid_chain_fields(stack)
    unit = np.float32(1.0 / max(float(np.max(stack)), 1e-12))
    fields = np.zeros_like(coarse)
    fields[0] = coarse[0]
    previous = warp(stack[0] * unit, fields[0])
    for z in range(1, len(stack)):
        prealigned = warp(stack[z] * unit, coarse[z])
        fields[z] = compose(coarse[z], register(previous, prealigned))
        previous = warp(stack[z] * unit, fields[z])
    return fields


def tvl1_chain(stack: np.ndarray) -> np.ndarray:
    """The classic elastic baseline: the rigid chain, then TV-L1 optical flow (scikit-image) of each
    section against the previous aligned one, chained (each section is pulled onto its neighbour)."""
    from skimage.registration import optical_flow_tvl1

    return _elastic_chain(stack, lambda fixed, moving: optical_flow_tvl1(fixed, moving).astype(np.float32))


def elastix_chain(stack: np.ndarray, grid_spacing: float = 40.0) -> np.ndarray:
    """The classic intensity-based baseline: the rigid chain, then elastix's default B-spline registration
    (itk-elastix: mutual information, bending-energy penalty, 3 resolutions, control points every
    ``grid_spacing`` px) of each section against the previous aligned one, chained."""
    import itk

    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("bspline", 3, grid_spacing))

    def register(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
        images = itk.GetImageFromArray(np.ascontiguousarray(fixed)), itk.GetImageFromArray(np.ascontiguousarray(moving))
        _, transform = itk.elastix_registration_method(*images, parameter_object=params, log_to_console=False)
        with tempfile.TemporaryDirectory() as scratch:  # transformix writes its field to a file there
            field = itk.transformix_deformation_field(
                images[1], transform, output_directory=scratch, log_to_console=False
            )
            offsets = np.asarray(field).copy()  # (Y, X, (x, y)): fixed -> moving
        return np.stack([offsets[..., 1], offsets[..., 0]]).astype(np.float32)

    return _elastic_chain(stack, register)


def sofima_chain(stack: np.ndarray, pixel_nm: float = 10.0, min_peak: float = 1.6, k0: float = 0.01) -> np.ndarray:
    """The anchor of EVALUATION.md: the rigid chain, then SOFIMA's flow and elastic mesh (its alignment
    notebook's pipeline and settings), as ``(Z, 2, Y, X)`` pull fields.

    Flow between neighbouring prealigned sections in patches of 160 px every 40 px, at full and half
    resolution, cleaned and merged (islands under 400 nodes dropped, or under an eighth of the grid on small
    sections); then each section's mesh relaxed against the previous solved one (the chain). Lengths are the
    notebook's at 10 nm pixels, scaled by ``10 / pixel_nm``. ``min_peak`` is the least peak sharpness and
    ratio a flow vector keeps, ``k0`` the stiffness of the springs to the previous section (the in-section
    springs' is 0.1): the notebook's 1.6 and 0.01 by default. Needs SOFIMA, installed from its repository
    (``pip install git+https://github.com/google-research/sofima``).
    """
    from connectomics.common import bounding_box
    from sofima import flow_field, flow_utils, map_utils, mesh

    from emalign.downsample import block_mean
    from emalign.fields import compose, resample, warp

    scale = 10.0 / pixel_nm
    patch, stride = round(160 * scale), round(40 * scale)
    coarse = rigid_chain_fields(stack)
    prealigned = np.stack(
        [warp(section.astype(np.float32), field) for section, field in zip(stack, coarse, strict=True)]
    )
    correlator = flow_field.JAXMaskedXCorrWithStatsCalculator()

    def neighbour_flows(sections: np.ndarray) -> np.ndarray:
        flows = [
            correlator.flow_field(before, after, (patch, patch), (stride, stride), batch_size=256)
            for before, after in zip(sections[:-1], sections[1:], strict=True)
        ]
        pad = patch // 2 // stride
        flows = np.transpose(np.array(flows), [1, 0, 2, 3])
        flows = np.pad(flows, [(0, 0), (0, 0), (pad, pad), (pad, pad)], constant_values=np.nan)
        return flow_utils.clean_flow(
            flows,
            min_peak_ratio=min_peak,
            min_peak_sharpness=min_peak,
            max_magnitude=80 * scale,
            max_deviation=20 * scale,
        )

    full = neighbour_flows(prealigned)
    half = neighbour_flows(block_mean(prealigned, 2))
    full_box = bounding_box.BoundingBox(start=(0, 0, 0), size=(full.shape[-1], full.shape[-2], 1))
    half_box = bounding_box.BoundingBox(start=(0, 0, 0), size=(half.shape[-1], half.shape[-2], 1))
    upsampled = np.concatenate(
        [2 * map_utils.resample_map(half[:, z : z + 1], half_box, full_box, 2, 1) for z in range(half.shape[1])], axis=1
    )
    nodes = full.shape[-1] * full.shape[-2]
    flows = flow_utils.reconcile_flows(
        (full, upsampled), max_gradient=0, max_deviation=20 * scale, min_patch_size=min(400, nodes // 8)
    )
    config = mesh.IntegrationConfig(
        dt=0.001, gamma=0.0, k0=k0, k=0.1, stride=(stride, stride), num_iters=1000, max_iters=100000,
        stop_v_max=0.005, dt_max=1000, start_cap=0.01, final_cap=10, prefer_orig_order=True,
    )  # fmt: skip
    solved, origin = [np.zeros_like(flows[:, :1])], np.zeros(2)
    for z in range(flows.shape[1]):
        target = map_utils.compose_maps_fast(flows[:, z : z + 1], origin, stride, solved[-1], origin, stride)
        solved.append(np.asarray(mesh.relax_mesh(np.zeros_like(solved[0]), target, config)[0]))
    inverse = map_utils.invert_map(np.concatenate(solved, axis=1), full_box, full_box, stride)
    fields = np.empty_like(coarse)
    for z, field in enumerate(coarse):
        pull = map_utils.fill_missing(inverse[:, z : z + 1], extrapolate=True, invalid_to_zero=True)[::-1, 0]
        fields[z] = compose(field, resample(pull.astype(np.float32), stride, 1, stack.shape[1:]))
    return fields


def emalign_aligner(method: str = "stitched", model: str = "faemreg-small", **options) -> Aligner:
    """emalign's in-memory engine as an :data:`Aligner`."""

    def align(stack: np.ndarray) -> np.ndarray:
        return register_sections(stack, model=model, method=method, **options).fields

    return align


def write_tiff(path: str | Path, stack: np.ndarray, voxel_size: tuple[float, float, float] | None = None) -> None:
    """Write ``stack`` as a multi-page TIFF; ``voxel_size`` ``(z, y, x)`` nm, when given, as ImageJ calibration
    (what :mod:`emalign.io` reads as the stack's voxel size), else a plain TIFF."""
    import tifffile

    if voxel_size is None:
        tifffile.imwrite(path, stack)
        return
    dz, dy, dx = voxel_size
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / dx, 1 / dy), metadata={"spacing": dz, "unit": "nm"})


def pipeline_aligner(
    workdir: str | Path,
    params=None,
    scheduler_spec: str = "threads",
    device: str = "auto",
    voxel_size: tuple[float, float, float] | None = None,
) -> Aligner:
    """The full pipeline (TIFF in, OME-Zarr out under ``workdir``) as an :data:`Aligner`.

    ``voxel_size`` ``(z, y, x)`` nm, when given, goes into the input TIFF (:func:`write_tiff`).
    """
    from emalign.pipeline import AlignParams, align

    def run(stack: np.ndarray) -> np.ndarray:
        workdir_path = Path(workdir)
        workdir_path.mkdir(parents=True, exist_ok=True)
        write_tiff(workdir_path / "input.tif", stack, voxel_size)
        ws, _, _ = align(
            workdir_path / "input.tif",
            workdir_path / "aligned.zarr",
            params or AlignParams(),
            scheduler_spec,
            device,
            overwrite=True,
            progress=False,
        )
        return full_resolution_fields(ws)

    return run


def evaluate(
    aligned_stack: np.ndarray,
    aligners: dict[str, Aligner],
    seed: int = 0,
    artifacts: Sequence[str] = (),
    misalignment: dict | None = None,
    watch: Sequence[int] | None = None,
    fail_px: float = 25.0,
) -> dict[str, dict]:
    """Misalign ``aligned_stack`` with known fields, run each aligner, return its metrics.

    Returns ``{name: metrics dict + {"seconds": ..., "mpx_per_s": ...}}``, measured where each raw section imaged the
    frame (:func:`emalign.metrics.imaged`); sections blanked by artifacts are left out of the metrics, and ``fail``
    counts residuals above ``fail_px``. ``"torn_adj"`` is
    :func:`torn_section_error` of the ``watch`` sections (default: those torn by ``"crack"`` artifacts),
    listed in ``"torn_sections"``, when there are any.
    """
    case = synth.misalign(aligned_stack, seed=seed, artifacts=artifacts, **(misalignment or {}))
    excluded = [z for z, flag in enumerate(case.flags) if flag == "blank"]
    torn = [z for z, flag in enumerate(case.flags) if flag == "crack"] if watch is None else list(watch)
    seen = metrics.imaged(case.fields)
    results = {}
    for name, align in aligners.items():
        start = time.perf_counter()
        fields = align(case.stack)
        seconds = time.perf_counter() - start
        residual = metrics.residual_fields(case.fields, fields)
        result = metrics.alignment_metrics(residual, fail_px=fail_px, estimate=fields, exclude=excluded, seen=seen)
        if torn:
            result["torn_adj"] = torn_section_error(residual, torn)
            result["torn_sections"] = tuple(torn)
        result["seconds"] = seconds
        result["mpx_per_s"] = case.stack.size / 1e6 / max(seconds, 1e-9)
        results[name] = result
    return results


def torn_section_error(residual: np.ndarray, torn: Sequence[int], margin: float = 0.1) -> float:
    """RMS (px) over the ``torn`` sections of their residual minus the mean of their neighbours' residuals.

    ``residual``: ``(Z, 2, Y, X)`` as from :func:`emalign.metrics.residual_fields`; the interior
    (:func:`emalign.metrics.interior`) is measured, as in :func:`emalign.metrics.alignment_metrics`.
    A torn section whose pieces each line up with the sections around it scores like an intact one; a
    field smeared across the tear leaves part of the jump in both pieces.
    """
    errors = np.stack([residual[z] - (residual[z - 1] + residual[z + 1]) / 2 for z in torn])
    return float(np.sqrt(np.mean(np.sum(metrics.interior(errors, margin) ** 2, axis=1))))


def mean_range(values: Sequence[float], unit: float = 1.0) -> str:
    """``"mean (min-max)"`` of ``values`` times ``unit``, 2 decimals (just the value for one): one table cell over
    several misalignments."""
    array = np.asarray(values, dtype=np.float64) * unit
    if len(array) == 1:
        return f"{array[0]:.2f}"
    return f"{array.mean():.2f} ({array.min():.2f}-{array.max():.2f})"


def seed_cells(runs: Sequence[dict[str, dict]], keys: Sequence[str] = ("rms", "adj", "drift")) -> dict[str, list[str]]:
    """Per method of ``runs`` (:func:`evaluate`'s results, one per misalignment), the :func:`mean_range` of each
    metric in ``keys``: the cells of a table row."""
    return {name: [mean_range([run[name][key] for run in runs]) for key in keys] for name in runs[0]}


def markdown_table(results: dict[str, dict], title: str = "") -> str:
    """The metrics as a Markdown table (px, %, seconds)."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| method | rms px | adj px | drift px | fail % | fold % | slope px/section | s |", "|---" * 8 + "|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['rms']:.2f} | {r['adj']:.2f} | {r['drift']:.2f} | {100 * r['fail']:.1f} | "
            f"{r['fold']:.2f} | {r['slope']:+.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


__all__ = [
    "FLYEM",
    "ISBI",
    "NO_MISALIGNMENT",
    "SHARED_DATA",
    "best_offset",
    "elastix_chain",
    "emalign_aligner",
    "evaluate",
    "isbi_reference",
    "markdown_table",
    "mean_range",
    "no_alignment",
    "pipeline_aligner",
    "print_and_save",
    "remove_section_offsets",
    "rigid_chain_fields",
    "sofima_chain",
    "torn_section_error",
    "tvl1_chain",
    "write_tiff",
]


def print_and_save(text: str, path: str | Path) -> None:
    """Print a benchmark's ``text`` and write it to ``path`` (its folder made as needed)."""
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text.rstrip("\n") + "\n")
