"""The streaming pipeline through its Python API: align, run_stage, Workspace, AlignParams.

Stacks are tiny (12 x 96 x 96) and ``block=4`` so there are several blocks per stage; dask runs
with the ``sync`` scheduler so tasks are run in this thread (monkeypatching works, timings are stable).
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from helpers import one_line_error

import emalign.pipeline.adapt as adapt_stage
import emalign.pipeline.estimate as estimate_stage
import emalign.pipeline.render as render_stage
from emalign import models
from emalign.cluster import scheduler
from emalign.errors import EmalignError
from emalign.fields import compose, folding_percent, resample, warp
from emalign.io import Stack, downsample2, is_complete, open_stack
from emalign.metrics import adjacent_correlation, alignment_metrics, residual_fields
from emalign.pipeline import AlignParams, Workspace, align, align_in_memory, open_workspace, refine, run_stage
from emalign.pipeline.adapt import adapt_model, aligned_sample, longest_run, prealigned_sample
from emalign.pipeline.estimate import break_threshold, damaged_sections, find_breaks, matched_scores
from emalign.pipeline.qc import COLUMNS
from emalign.synth import demo_stack

SHAPE = (12, 96, 96)
PARAMS = AlignParams(block=4, polish="on", polish_patch=32)  # polish: the stage runs whatever the stack
RUN = {"scheduler_spec": "sync", "device": "cpu", "progress": False}
STAGE = {"compute": {"scheduler": "sync", "num_workers": 1}, "device": "cpu", "progress": False}


def level0(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["0"][:])


def global_fields(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["fields/global"][:])


def upsampled(fields: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    return np.stack([resample(f, stride, 1, shape) for f in fields])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A misaligned synthetic stack with its ground truth, written as a TIFF."""
    folder = tmp_path_factory.mktemp("input")
    _, misaligned = demo_stack(SHAPE, seed=1)
    path = folder / "stack.tif"
    tifffile.imwrite(path, misaligned.stack, photometric="minisblack")
    return path, misaligned


@pytest.fixture(scope="module")
def aligned(case, tmp_path_factory):
    """One uninterrupted alignment of `case`, shared by the tests that only read it."""
    path, _ = case
    out = tmp_path_factory.mktemp("aligned") / "out.zarr"
    ws, seconds, report = align(path, out, PARAMS, **RUN)
    return out, ws, seconds, report


# --- the output -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_align_writes_a_complete_ome_zarr_of_the_input_shape_and_dtype(case, aligned):
    path, misaligned = case
    out, ws, seconds, report = aligned
    assert is_complete(out)
    assert set(seconds) == {"prealign", "estimate", "stitch", "refine", "polish", "render", "qc"}
    assert "sections: 12" in report
    group = zarr.open_group(str(out), mode="r")
    assert group["0"].shape == misaligned.stack.shape
    assert group["0"].dtype == misaligned.stack.dtype
    assert ws.writer.done_sections().all()
    for stage in ("prealign", "estimate", "stitch", "refine", "polish"):
        assert ws.stage_done(stage).all()
    assert len(ws.stage_done("estimate")) == 3  # 12 sections in blocks of 4
    assert len(ws.stage_done("refine")) == len(ws.stage_done("polish")) == 4  # and the solve


@pytest.mark.e2e
def test_align_output_multiscales_read_back_with_ome_zarr_py(aligned):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    out, *_ = aligned
    location = parse_url(str(out))
    assert location is not None
    nodes = list(Reader(location)())
    assert nodes and any(isinstance(spec, Multiscales) for spec in nodes[0].specs)
    node = nodes[0]
    assert [axis["name"] for axis in node.metadata["axes"]] == ["z", "y", "x"]
    assert [tuple(level.shape) for level in node.data] == [SHAPE]  # 96 px: a single level
    np.testing.assert_array_equal(np.asarray(node.data[0]), level0(out))
    from ome_zarr_models.v05 import Image

    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["ome"]["version"] == "0.5" and group.metadata.zarr_format == 3
    assert Image.from_zarr(group).attributes.ome.multiscales[0].datasets[0].path == "0"  # a valid NGFF 0.5 image


@pytest.mark.e2e
def test_align_records_provenance_params_plan_model_and_input(case, aligned):
    path, _ = case
    out, ws, *_ = aligned
    meta = dict(zarr.open_group(str(out), mode="r").attrs["emalign"])
    assert meta["complete"] is True
    assert meta["params"] == PARAMS.to_dict()
    assert AlignParams.from_dict(meta["params"]) == PARAMS
    assert meta["plan"]["shape"] == list(SHAPE)
    assert meta["plan"]["blocks"] == [[0, 4], [4, 8], [8, 12]]
    assert meta["plan"]["grid_shape"] == [12, 12]
    assert meta["model"]["name"] == "faemreg-small"
    assert meta["model"]["sha256"] == models.checksum("faemreg-small")
    digest = hashlib.sha256(models.checkpoint_path("faemreg-small").read_bytes()).hexdigest()
    assert digest.startswith(meta["model"]["sha256"])
    assert meta["input"] == {"path": str(path.resolve()), "shape": list(SHAPE), "dtype": "uint8"}
    assert ws.input_path == str(path.resolve())
    reopened = open_workspace(out)
    assert reopened.params == PARAMS and reopened.plan.shape == SHAPE


@pytest.mark.e2e
def test_align_writes_qc_table_with_one_row_per_section_and_a_plot(aligned):
    out, *_ = aligned
    with open(out / "qc.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert (
        tuple(reader.fieldnames)
        == COLUMNS
        == ("z", "flags", "corr_before", "corr_after", "field_rms_px", "folding_pct")
    )
    assert [int(row["z"]) for row in rows] == list(range(SHAPE[0]))
    assert all(row["flags"] == "" for row in rows)
    assert rows[0]["corr_before"] == "nan"
    for row in rows[1:]:
        assert -1 <= float(row["corr_before"]) <= 1 and -1 <= float(row["corr_after"]) <= 1
        assert float(row["field_rms_px"]) > 0
    assert (out / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_aligned_adjacent_correlation_is_higher_than_raw(case, aligned):
    _, misaligned = case
    out, *_ = aligned
    raw = np.nanmedian(adjacent_correlation(misaligned.stack))
    after = np.nanmedian(adjacent_correlation(level0(out)))
    assert raw < 0.3
    assert after > raw + 0.25


@pytest.mark.e2e
def test_global_fields_recover_the_ground_truth_much_better_than_no_alignment(case, aligned):
    _, misaligned = case
    out, ws, *_ = aligned
    fields = upsampled(global_fields(out), ws.params.stride, SHAPE[1:])
    error = alignment_metrics(residual_fields(misaligned.fields, fields), estimate=fields)
    baseline = alignment_metrics(residual_fields(misaligned.fields, np.zeros_like(fields)))
    # measured: rms 1.9 px vs 15.5 px without alignment
    assert baseline["rms"] > 10
    assert error["rms"] < 0.3 * baseline["rms"]
    assert error["adj"] < 0.3 * baseline["adj"]
    assert error["fold"] == 0.0


@pytest.mark.e2e
def test_qc_folding_is_measured_in_full_resolution_pixels(aligned, tmp_path):
    reference, *_ = aligned
    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    ws = Workspace(out)
    (gy, gx), stride = ws.plan.grid_shape, ws.params.stride
    stretch = np.zeros((2, gy, gx), np.float32)
    stretch[1] = -0.5 * stride * np.arange(gx)[None, :]  # p -> p + u(p) halves x: Jacobian determinant 0.5
    assert folding_percent(resample(stretch, stride, 1, SHAPE[1:])) == 0.0
    ws.array("fields/global")[3] = stretch
    run_stage("qc", ws, **STAGE)
    with open(out / "qc.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[3]["field_rms_px"]) > 0
    assert float(rows[3]["folding_pct"]) == 0.0


@pytest.mark.e2e
def test_pyramid_levels_are_listed_in_multiscales_and_are_2x_means(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    _, misaligned = demo_stack((4, 264, 264), seed=4)
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, misaligned.stack, photometric="minisblack")
    out = tmp_path / "wide.zarr"
    align(path, out, AlignParams(block=2), **RUN)
    assert is_complete(out)
    group = zarr.open_group(str(out), mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1"]
    assert datasets[1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]
    assert group["1"].shape == (4, 132, 132)
    top, half = np.asarray(group["0"][:]), np.asarray(group["1"][:])
    for z in range(4):
        np.testing.assert_array_equal(half[z], downsample2(top[z]))
    node = next(iter(Reader(parse_url(str(out)))()))
    assert [tuple(level.shape) for level in node.data] == [(4, 264, 264), (4, 132, 132)]


@pytest.mark.e2e
def test_refine_removes_per_section_shifts_left_in_the_stitched_fields(aligned, tmp_path):
    """Shifts added to the stitched fields (wander the network left) come back out of the refine stage."""
    reference, *_ = aligned
    out = tmp_path / "wander.zarr"
    shutil.copytree(reference, out)
    ws = Workspace(out)
    stitched = np.asarray(ws.array("fields/stitched")[:])
    wander = np.random.default_rng(3).normal(0, 3, (len(stitched), 2)).astype(np.float32)
    ws.array("fields/stitched")[:] = stitched + wander[:, :, None, None]
    ws.array("stages/refine")[:] = False
    assert "translation solve done" in run_stage("refine", ws, **STAGE)
    assert ws.stage_done("refine").all()
    left = (np.asarray(ws.array("fields/refined")[:]) - stitched)[:, :, 2:-2, 2:-2].mean((2, 3))
    assert wobble(left) < 0.25 * wobble(wander), (left, wander)


@pytest.mark.e2e
@pytest.mark.parametrize(("peak", "factor"), [(0.45, 1.0), (0.85, 10.0)])
def test_refine_keeps_a_stiffer_trend_along_z_at_fine_spacing(aligned, tmp_path, monkeypatch, peak, factor):
    """Neighbours that are nearly the same image (fine z-spacing) drift less: the refine solve keeps a trend stiffer
    than the prealignment's shift trend."""
    reference, *_ = aligned
    out = tmp_path / "fine.zarr"
    shutil.copytree(reference, out)
    ws = Workspace(out)
    pairs = np.asarray(ws.array("refine/pairs")[:])
    pairs[:, 0, 6] = peak
    ws.array("refine/pairs")[:] = pairs
    stiffness = []
    solve = refine.solve_pairs
    monkeypatch.setattr(refine, "solve_pairs", lambda *args: stiffness.append(args[-1]) or solve(*args))
    refine.solve_refinement(ws)
    np.testing.assert_allclose(stiffness[0], factor * np.asarray(ws.array("coarse/stiffness")[:]))


def wobble(shifts: np.ndarray) -> float:
    """RMS of ``(Z, C)`` shifts about their per-column straight line along z (an aligner may keep a common
    offset and a shear along z)."""
    z = np.arange(len(shifts))
    return float(np.sqrt(np.mean([(s - np.polyval(np.polyfit(z, s, 1), z)) ** 2 for s in shifts.T])))


@pytest.mark.e2e
def test_polish_removes_local_shifts_left_in_the_refined_fields(aligned, tmp_path):
    """A shift that differs across the section (a shear the refine stage cannot see) comes back out of the polish."""
    reference, *_ = aligned
    polished = {}
    for name, amplitude in (("clean", 0.0), ("sheared", 2.0)):
        out = tmp_path / f"{name}.zarr"
        shutil.copytree(reference, out)
        ws = Workspace(out)
        refined = np.asarray(ws.array("fields/refined")[:])
        gx = refined.shape[-1]
        slopes = np.random.default_rng(5).normal(0, amplitude, len(refined)).astype(np.float32)
        across = np.linspace(-1, 1, gx, dtype=np.float32)  # dx grows from one side of the section to the other
        sheared = refined.copy()
        sheared[:, 1] += slopes[:, None, None] * across[None, None, :]
        ws.array("fields/refined")[:] = sheared
        ws.array("stages/polish")[:] = False
        assert "node solve done" in run_stage("polish", ws, **STAGE)
        polished[name] = np.asarray(ws.array("fields/global")[:])
    left = (polished["sheared"] - polished["clean"])[:, 1, 2:-2, 2:-2].mean(axis=1)  # (Z, gx): dx across x
    added = slopes[:, None] * across[None, 2:-2]
    # without the polish all of it would stay (left == added); it takes out about 70 % on this 12-section stack
    assert wobble(left) < 0.4 * wobble(added), (wobble(left), wobble(added))


def test_polish_node_shifts_keep_a_smooth_flow_under_a_soft_trend_segment_by_segment():
    """Each segment takes its first section's trend stiffness: where it is soft (the prealignment found the raw
    sections stepping no further than their content flows) a node's smooth drift is kept, where stiff corrected."""
    from emalign.pipeline.polish import node_shifts
    from emalign.pipeline.store import OFFSETS

    depth, nodes = 24, (2, 2)
    z = np.arange(depth, dtype=float)
    flow = 3.0 * np.sin(z / 3.0)[:, None, None, None] * np.ones((1, *nodes, 2))  # a smooth drift, ~1 px a section
    pairs = np.full((depth, len(OFFSETS), *nodes, 3), np.nan)
    for slot, k in enumerate(OFFSETS):
        pairs[k:, slot, ..., :2] = flow[k:] - flow[:-k]
        pairs[k:, slot, ..., 2] = 0.8
    stiffness = np.where(z < 12, 1.0, 1e3)  # the first segment soft, the second stiff
    shifts = node_shifts(pairs, np.zeros(depth, bool), [12], stiffness)
    soft, stiff = np.abs(shifts[:12]).max(), np.abs(shifts[12:]).max()
    assert soft < 0.2 and stiff > 1.0, (soft, stiff)


@pytest.mark.e2e
@pytest.mark.parametrize(("peak", "polished"), [(0.45, False), (0.85, True)])
def test_polish_auto_polishes_only_a_stack_whose_neighbours_correlate_strongly(aligned, tmp_path, peak, polished):
    reference, *_ = aligned
    out = tmp_path / "auto.zarr"
    shutil.copytree(reference, out)
    group = zarr.open_group(str(out), mode="r+")
    meta = dict(group.attrs["emalign"])
    group.attrs["emalign"] = {**meta, "params": {**meta["params"], "polish": "auto"}}
    ws = Workspace(out)
    pairs = np.asarray(ws.array("refine/pairs")[:])
    pairs[:, 0, 6] = peak  # adjacent sections' correlation after the refine stage
    ws.array("refine/pairs")[:] = pairs
    ws.array("stages/polish")[:] = False
    ws.array("polish/pairs")[:] = np.nan
    report = run_stage("polish", ws, **STAGE)
    assert ws.stage_done("polish").all()
    assert (f"median peak {peak:.2f}" in report) and (("off" in report) != polished), report
    refined, final = np.asarray(ws.array("fields/refined")[:]), np.asarray(ws.array("fields/global")[:])
    assert np.isfinite(np.asarray(ws.array("polish/pairs")[:])).any() == polished
    assert np.array_equal(final, refined) != polished


# --- resuming ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_resume_after_a_partial_estimate_matches_the_uninterrupted_run(case, aligned, tmp_path, monkeypatch):
    path, _ = case
    reference, *_ = aligned
    out = tmp_path / "resumed.zarr"
    ws = Workspace.create(open_stack(path), out, PARAMS)
    run_stage("prealign", ws, **STAGE)
    run_stage("estimate", ws, "0:8", **STAGE)
    assert ws.stage_done("prealign").tolist() == [True] * 3
    assert ws.stage_done("estimate").tolist() == [True, True, False]
    assert not ws.stage_done("stitch").any()
    assert not ws.writer.done_sections().any()
    assert not is_complete(out)

    calls: dict[str, list[int]] = {"prealign": [], "estimate": [], "render": []}

    def recording(stage, func):
        def wrapper(ws, stack, index, *args, **kwargs):
            calls[stage].append(index)
            return func(ws, stack, index, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(estimate_stage, "prealign_block", recording("prealign", estimate_stage.prealign_block))
    monkeypatch.setattr(estimate_stage, "estimate_block", recording("estimate", estimate_stage.estimate_block))
    monkeypatch.setattr(render_stage, "render_block", recording("render", render_stage.render_block))
    align(path, out, PARAMS, **RUN)
    assert calls["prealign"] == [] and calls["estimate"] == [2]
    assert sorted(calls["render"]) == [0, 1, 2]
    assert is_complete(out)
    np.testing.assert_array_equal(level0(out), level0(reference))
    np.testing.assert_array_equal(global_fields(out), global_fields(reference))

    calls = {"prealign": [], "estimate": [], "render": []}
    align(path, out, PARAMS, **RUN)  # a finished output: nothing is recomputed
    assert calls == {"prealign": [], "estimate": [], "render": []}
    assert is_complete(out)


def test_run_stage_refuses_to_run_a_stage_before_the_one_it_needs(case, tmp_path):
    path, _ = case
    out = tmp_path / "early.zarr"
    ws = Workspace.create(open_stack(path), out, PARAMS)
    one_line_error(out, run_stage, "estimate", ws, match="prealign", **STAGE)
    one_line_error(out, run_stage, "stitch", ws, match="estimate", **STAGE)
    one_line_error(out, run_stage, "refine", ws, match="stitch", **STAGE)
    one_line_error(out, run_stage, "polish", ws, match="refine", **STAGE)
    one_line_error(out, run_stage, "render", ws, match="polish", **STAGE)
    with pytest.raises(EmalignError, match="selects no section"):
        run_stage("prealign", ws, "5:2", **STAGE)
    with pytest.raises(EmalignError, match="START:STOP"):
        run_stage("prealign", ws, "five", **STAGE)
    assert not ws.stage_done("prealign").any()
    assert not is_complete(out)


@pytest.mark.e2e
def test_run_stage_rejects_an_unknown_stage_with_an_emalign_error(aligned):
    _, ws, *_ = aligned
    with pytest.raises(EmalignError, match="unknown stage"):
        run_stage("bogus", ws, **STAGE)


def test_open_workspace_of_a_missing_output_is_a_one_line_error(tmp_path):
    one_line_error(tmp_path / "nothing.zarr", open_workspace, tmp_path / "nothing.zarr", match="no such output")


# --- parameters -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_an_output_made_with_other_params_is_refused_unless_overwrite(case, aligned, tmp_path):
    path, _ = case
    reference, *_ = aligned
    before = dict(zarr.open_group(str(reference), mode="r").attrs["emalign"])
    one_line_error(reference, align, path, reference, AlignParams(block=4, stride=16), match="different params", **RUN)
    assert dict(zarr.open_group(str(reference), mode="r").attrs["emalign"]) == before
    assert is_complete(reference)

    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, demo_stack((6, 64, 64), seed=2)[1].stack, photometric="minisblack")
    other = AlignParams(block=2, stride=16, skip=(3,))
    one_line_error(out, align, small, out, other, match="another input|different params", **RUN)
    ws, _, _ = align(small, out, other, overwrite=True, **RUN)
    assert is_complete(out)
    meta = zarr.open_group(str(out), mode="r").attrs["emalign"]
    assert meta["params"] == other.to_dict()
    assert meta["input"]["path"] == str(small.resolve())
    assert ws.params == other
    assert ws.plan.grid_shape == (4, 4)
    assert ws.flags()[3] == 4  # skipped
    assert level0(out).shape == (6, 64, 64)


@pytest.mark.e2e
def test_resuming_an_output_that_lacks_an_array_of_this_version_names_it_and_writes_nothing(case, aligned, tmp_path):
    path, _ = case
    reference, *_ = aligned
    out = tmp_path / "older.zarr"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "coarse" / "stiffness")  # as written before the prealignment stored its trend's stiffness
    before = sorted(str(file.relative_to(out)) for file in out.rglob("*"))
    one_line_error(out, align, path, out, PARAMS, match="older emalign.*coarse/stiffness.*--overwrite", **RUN)
    assert sorted(str(file.relative_to(out)) for file in out.rglob("*")) == before
    align(path, out, PARAMS, overwrite=True, **RUN)
    assert np.array_equal(level0(out), level0(reference))


def test_invalid_params_are_refused_before_anything_is_written(case, tmp_path):
    path, _ = case
    out = tmp_path / "bad-plan.zarr"
    with pytest.raises(EmalignError, match="bad plan"):
        align(path, out, AlignParams(tile=64, halo=32), **RUN)
    with pytest.raises(EmalignError, match="stitch overlap"):
        align(path, out, AlignParams(stitch_block=8, stitch_overlap=8), **RUN)
    assert not out.exists()


@pytest.mark.e2e
def test_an_output_of_another_input_with_the_same_params_is_refused(aligned, tmp_path):
    reference, *_ = aligned
    out = tmp_path / "copy.zarr"
    shutil.copytree(reference, out)
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, demo_stack(SHAPE, seed=7)[1].stack, photometric="minisblack")
    one_line_error(out, align, other, out, PARAMS, **RUN)


# --- bad sections -----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_blank_and_skipped_sections_are_flagged_passed_through_and_bridged(case, tmp_path):
    _, misaligned = case
    raw = misaligned.stack.copy()
    raw[5] = 0
    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, raw, photometric="minisblack")
    out = tmp_path / "bad.zarr"
    ws, _, report = align(path, out, AlignParams(block=4, skip=(9,)), **RUN)
    assert is_complete(out)
    assert "flagged: 2" in report

    with open(out / "qc.csv", newline="") as handle:
        rows = {int(row["z"]): row for row in csv.DictReader(handle)}
    assert {z: row["flags"] for z, row in rows.items() if row["flags"]} == {5: "blank", 9: "skipped"}
    assert ws.flags()[5] == 1 and ws.flags()[9] == 4

    result = level0(out)
    np.testing.assert_array_equal(result[5], raw[5])
    np.testing.assert_array_equal(result[9], raw[9])
    assert not np.array_equal(result[4], raw[4]) and not np.array_equal(result[10], raw[10])
    assert float(rows[9]["field_rms_px"]) == 0.0 and float(rows[5]["field_rms_px"]) == 0.0

    # neighbours: aligned with their own neighbours, and with each other across the gap
    for z in (4, 7, 8, 11):
        assert float(rows[z]["corr_after"]) > float(rows[z]["corr_before"]) + 0.1
    for a, b in ((4, 6), (8, 10)):
        assert adjacent_correlation(result[[a, b]])[0] > adjacent_correlation(raw[[a, b]])[0] + 0.1
    fields = upsampled(global_fields(out), ws.params.stride, SHAPE[1:])
    error = alignment_metrics(residual_fields(misaligned.fields, fields), exclude=[5, 9])
    baseline = alignment_metrics(residual_fields(misaligned.fields, np.zeros_like(fields)), exclude=[5, 9])
    assert error["rms"] < 0.3 * baseline["rms"]


@pytest.mark.e2e
def test_a_stack_of_two_unrelated_blocks_is_split_at_the_break_and_each_part_aligned(tmp_path):
    parts = [demo_stack((8, 96, 96), seed=seed)[1] for seed in (1, 2)]
    raw = np.concatenate([p.stack for p in parts])
    truth = np.concatenate([p.fields for p in parts])
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, raw, photometric="minisblack")
    out = tmp_path / "two.zarr"
    ws, _, report = align(path, out, PARAMS, **RUN)
    assert ws.breaks() == (8,) and not ws.excluded().any()
    with open(out / "qc.csv", newline="") as handle:
        assert {int(r["z"]): r["flags"] for r in csv.DictReader(handle) if r["flags"]} == {8: "break"}
    fields = upsampled(global_fields(out), ws.params.stride, raw.shape[1:])
    for part in (slice(0, 8), slice(8, 16)):
        error = alignment_metrics(residual_fields(truth[part], fields[part]))
        baseline = alignment_metrics(residual_fields(truth[part], np.zeros_like(fields[part])))
        assert error["rms"] < 0.3 * baseline["rms"]


@pytest.mark.e2e
def test_adapt_fine_tunes_a_checkpoint_on_the_stack_records_it_and_estimates_with_it(case, aligned, tmp_path):
    path, misaligned = case
    out = tmp_path / "adapted.zarr"
    ws, seconds, _ = align(path, out, AlignParams(block=4, adapt=3), **RUN)
    assert "adapt" in seconds and is_complete(out) and ws.model == str(out / "model" / "adapted.pt")
    ckpt = torch.load(out / "model" / "adapted.pt", map_location="cpu", weights_only=False)
    record = ckpt["adaptation"]
    assert record["base_model"] == "faemreg-small" and record["steps"] == 3
    assert record["input"] == str(path.resolve()) and record["sample"]["sections"] == [0, SHAPE[0]]
    assert record["sample"]["aligned_by"] == "faemreg-small"
    base = models.load("faemreg-small").state_dict()
    assert any(not torch.equal(base[key], value) for key, value in ckpt["state"].items())
    change = sum(float((value - base[key]).float().square().sum()) for key, value in ckpt["state"].items())
    size = sum(float(value.float().square().sum()) for value in base.values())
    assert change < 1e-4 * size  # fine-tuned from the shipped weights, not drawn afresh
    assert not (out / "model" / "run").exists()
    assert not np.array_equal(global_fields(out), global_fields(aligned[0]))
    error = alignment_metrics(residual_fields(misaligned.fields, upsampled(global_fields(out), 8, SHAPE[1:])))
    baseline = alignment_metrics(residual_fields(misaligned.fields, np.zeros_like(misaligned.fields)))
    assert error["rms"] < 0.3 * baseline["rms"]


def prealigned_for_adaptation(path: Path, out: Path) -> tuple[Workspace, Stack]:
    """A workspace at ``out`` asking for ``--adapt 2`` on the stack at ``path``, prealigned; and the stack."""
    stack = open_stack(path)
    ws = Workspace.create(stack, out, AlignParams(block=4, adapt=2))
    run_stage("prealign", ws, **STAGE)
    return ws, stack


@pytest.mark.e2e
def test_adaptation_trains_on_a_sample_the_base_model_aligned_not_only_prealigned(case, tmp_path):
    ws, stack = prealigned_for_adaptation(case[0], tmp_path / "sample.zarr")
    prealigned, where = prealigned_sample(ws, stack)
    aligned = aligned_sample(prealigned, "faemreg-small", align_in_memory, "cpu")
    assert where["sections"] == [0, SHAPE[0]] and aligned.shape == prealigned.shape and aligned.dtype == np.float32
    before, after = np.nanmean(adjacent_correlation(prealigned)), np.nanmean(adjacent_correlation(aligned))
    assert after > before + 0.01  # the demo stack's neighbours: 0.59 prealigned, 0.61 aligned


@pytest.mark.e2e
def test_adaptation_hands_the_aligned_sample_itself_to_training(case, tmp_path, monkeypatch):
    ws, stack = prealigned_for_adaptation(case[0], tmp_path / "handed.zarr")
    seen = {}

    class TrainingStarted(Exception):
        pass

    def recorded_alignment(sample, model, align, device="auto"):
        seen["aligned"] = sample + 1.0  # any array other than the prealigned sample
        return seen["aligned"]

    def recorded_training(cfg, out, **kwargs):
        seen["trained_on"] = kwargs["volumes"]
        raise TrainingStarted

    monkeypatch.setattr(adapt_stage, "aligned_sample", recorded_alignment)
    monkeypatch.setattr(adapt_stage, "train", recorded_training)
    with pytest.raises(TrainingStarted):
        adapt_model(ws, stack, align_in_memory, device="cpu", progress=False)
    assert len(seen["trained_on"]) == 1 and seen["trained_on"][0] is seen["aligned"]


@pytest.mark.e2e
def test_estimate_waits_for_adaptation_when_it_is_asked_for(case, tmp_path):
    ws, _ = prealigned_for_adaptation(case[0], tmp_path / "wait.zarr")
    with pytest.raises(EmalignError, match="run `emalign adapt` first"):
        run_stage("estimate", ws, **STAGE)


def test_the_longest_run_of_good_sections_is_trimmed_about_its_centre():
    excluded = np.zeros(20, bool)
    excluded[[3, 15]] = True
    assert longest_run(excluded, 100) == (4, 15)
    assert longest_run(excluded, 5) == (7, 12)
    assert longest_run(np.ones(4, bool), 5) == (0, 0)


@pytest.mark.e2e
def test_a_cracked_section_is_aligned_piece_by_piece_and_the_field_jumps_across_the_crack(case, tmp_path):
    _, misaligned = case
    z, crack, jump = 6, slice(44, 48), np.array([5.0, -4.0], np.float32)
    raw, truth = misaligned.stack.copy(), misaligned.fields.copy()
    constant = np.broadcast_to(jump[:, None, None], truth[z].shape).copy()
    moved, moved_truth = warp(raw[z].astype(np.float32), constant), compose(truth[z], constant)
    raw[z, crack.stop :] = np.clip(np.round(moved[crack.stop :]), 1, 255).astype(np.uint8)
    truth[z][:, crack.stop :] = moved_truth[:, crack.stop :]
    raw[z, crack] = 255  # the crack, imaged white: saturated, detected as invalid
    path = tmp_path / "cracked.tif"
    tifffile.imwrite(path, raw, photometric="minisblack")
    ws, _, _ = align(path, tmp_path / "cracked.zarr", PARAMS, **RUN)
    fields = upsampled(global_fields(tmp_path / "cracked.zarr"), ws.params.stride, SHAPE[1:])
    residual = residual_fields(truth, fields)
    against_neighbours = residual[z] - (residual[z - 1] + residual[z + 1]) / 2
    white = np.flatnonzero((level0(tmp_path / "cracked.zarr")[z] == 255).mean(1) > 0.5)  # the crack, aligned
    top, bottom = int(white.min()), int(white.max()) + 1
    above, below = slice(max(top - 24, 8), top - 8), slice(bottom + 8, min(bottom + 24, SHAPE[1] - 8))
    for rows in (above, below):  # each piece lines up with the sections around it (smeared: ~1.9 px above)
        assert np.sqrt(np.mean(against_neighbours[:, rows, 12:-12] ** 2)) < 1.7
    field = fields[z][:, :, 12:-12]
    step = field[:, below].mean((1, 2)) - field[:, above].mean((1, 2))
    assert np.dot(step, -jump) > 0.3 * np.dot(jump, jump)  # the pieces move apart, as the tear did
    edge = field[:, bottom + 8].mean(1) - field[:, top - 8].mean(1)  # one field grid cell from the crack
    assert np.dot(edge, -jump) > 0.8 * np.dot(step, -jump)  # ... right at the crack, not smeared around it


def test_a_user_mask_of_another_shape_is_a_one_line_error(case, tmp_path):
    path, _ = case
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, np.zeros((SHAPE[0], 10, 10), np.uint8))
    params = AlignParams(block=4, mask=str(mask))
    one_line_error(mask, align, path, tmp_path / "masked.zarr", params, match="does not match", **RUN)


def test_breaks_need_every_pair_across_the_gap_to_fail():
    scores = np.full((10, 3), 0.5)
    scores[4, :] = scores[5, 1:] = scores[6, 2] = 0.02  # every pair across the gap 3 | 4
    assert find_breaks(scores, np.zeros(10, bool), 0.1) == [4]
    scores[5, 1] = 0.4  # 5 still matches 3: the content continues, section 4 alone is poor
    assert find_breaks(scores, np.zeros(10, bool), 0.1) == []


def test_a_section_whose_pairs_stand_clear_of_unrelated_content_at_some_scale_is_not_damaged():
    scores = np.full((10, 3), 0.5)
    scores[4, :] = scores[5, 0] = scores[6, 1] = scores[7, 2] = 0.02  # every pair of section 4 (fine scale)
    margins = np.full((10, 3), 1.2)  # the pairs' best match at any scale over that scale's unrelated peak
    good = np.ones(10, bool)
    assert np.flatnonzero(damaged_sections(scores, matched_scores(scores, margins), good)).tolist() == [4]
    margins[6, 1] = 3.0  # a strained section: 4 and 6 match clearly at a coarser scale
    assert not damaged_sections(scores, matched_scores(scores, margins), good).any()
    unmeasured = matched_scores(scores, np.full((10, 3), np.nan))  # no second opinions: the fine scores decide
    assert np.flatnonzero(damaged_sections(scores, unmeasured, good)).tolist() == [4]


def test_a_gap_that_a_pair_spans_clearly_at_a_coarser_scale_is_no_break():
    scores = np.full((10, 3), 0.5)
    scores[4, :] = scores[5, 1:] = scores[6, 2] = 0.02  # every pair across the gap 3 | 4, at the fine scale
    margins = np.full((10, 3), np.nan)
    margins[5, 1] = 1.5
    assert find_breaks(matched_scores(scores, margins), np.zeros(10, bool), 0.1) == [4]
    margins[5, 1] = 2.5  # 5 and 3 match clearly at a coarser scale: the content continues
    assert find_breaks(matched_scores(scores, margins), np.zeros(10, bool), 0.1) == []


def test_weak_neighbours_above_the_noise_floor_of_unrelated_sections_are_no_break():
    # 60 nm FlyEM: neighbours score 0.25 (weakest 0.12), sections against a turned neighbour 0.09 +- 0.007
    unrelated = 0.09 + 0.007 * np.random.default_rng(0).standard_normal(40)
    threshold = break_threshold(0.25, unrelated, np.zeros(40, bool))
    assert 0.1 < threshold < 0.12
    assert break_threshold(0.25, np.full(40, np.nan), np.zeros(40, bool)) == 0.125  # no floor: half the median
    assert break_threshold(0.8, unrelated, np.zeros(40, bool)) == threshold  # fine spacing: the floor decides


@pytest.mark.e2e
def test_concurrent_prealign_blocks_do_not_lose_each_others_results(tmp_path):
    _, misaligned = demo_stack((48, 64, 64), seed=5)
    path = tmp_path / "many.tif"
    tifffile.imwrite(path, misaligned.stack, photometric="minisblack")
    results = {}
    for spec in ("sync", "threads:8"):
        ws = Workspace.create(open_stack(path), tmp_path / f"many-{spec[:4]}.zarr", AlignParams(block=1))
        with scheduler(spec) as compute:
            run_stage("prealign", ws, compute=compute, device="cpu", progress=False)
        results[spec] = ws
    sequential, concurrent = results["sync"], results["threads:8"]
    stats = np.asarray(concurrent.array("sections/stats")[:])
    assert (stats[:, 0] > 0).all(), f"sections with lost statistics: {np.flatnonzero(stats[:, 0] == 0)}"
    for name in ("sections/stats", "coarse/pairs", "coarse/margins", "coarse/matrices", "sections/flags"):
        np.testing.assert_array_equal(concurrent.array(name)[:], sequential.array(name)[:], err_msg=name)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
