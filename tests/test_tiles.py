"""Estimate and stitch tasks split over xy task tiles (``--task-tile``): bounded memory, no seams, resumable.

Stack: 6 x 128 x 128 with a network tile of 32 px, so a 64 px task tile reads less than the whole section.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import emalign.pipeline.estimate as estimate
from emalign.errors import EmalignError
from emalign.io import open_stack
from emalign.pipeline import AlignParams, Plan, Workspace, run_stage
from emalign.pipeline.estimate import task_region
from emalign.synth import demo_stack

SHAPE = (6, 128, 128)
PARAMS = AlignParams(block=3, tile=32, halo=4, smoothing=4.0)
TILED = AlignParams(block=3, tile=32, halo=4, smoothing=4.0, task_tile=64)
STAGE = {"compute": {"scheduler": "sync", "num_workers": 1}, "device": "cpu", "progress": False}


def fields(ws: Workspace, name: str) -> np.ndarray:
    return np.asarray(ws.array(f"fields/{name}")[:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "stack.tif"
    tifffile.imwrite(path, demo_stack(SHAPE, seed=1)[1].stack, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def estimated(stack, tmp_path_factory):
    """The same stack prealigned and estimated untiled (one task tile) and in 2 x 2 task tiles.

    Only no-data pixels are masked: the detected featureless and saturated areas of a task's region are judged
    against that region's median contrast, not the whole section's, and may differ a little by design. (The
    seed: on stacks with large no-data areas the network's field there follows float rounding of its input.)"""
    folder = tmp_path_factory.mktemp("outputs")
    whole = Workspace.create(open_stack(stack), folder / "whole.zarr", PARAMS)
    run_stage("prealign", whole, **STAGE)
    tiled = Workspace.create(open_stack(stack), folder / "tiled.zarr", TILED)
    for name in ("coarse/matrices", "coarse/stiffness", "sections/flags", "stages/prealign"):  # the same prealignment
        tiled.array(name)[:] = whole.array(name)[:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate, "invalid_pixels", lambda raw, user=None, typical=None: raw == 0)
        for ws in (whole, tiled):
            run_stage("estimate", ws, **STAGE)
    return whole, tiled


def test_task_tiles_cover_the_section_and_own_whole_chunks_of_the_field_grid():
    plan = Plan((2, 100, 70), AlignParams(stride=8, task_tile=30))
    assert plan.task_tile == 32  # rounded up to the stride
    assert plan.tiles() == [(y, x, min(32, 100 - y), min(32, 70 - x)) for y in (0, 32, 64, 96) for x in (0, 32, 64)]
    owner = np.zeros(plan.grid_shape, int)
    for tile in plan.tiles():
        rows, cols = plan.grid_slices(tile)
        assert rows.start % 4 == 0 and cols.start % 4 == 0  # a chunk (32 px / stride 8) starts at each tile
        owner[rows, cols] += 1
    assert (owner == 1).all()
    assert len(Plan((2, 100, 70)).tiles()) == 1  # the default: small sections are one tile


def test_an_estimate_task_reads_a_region_that_does_not_grow_with_the_section():
    params = AlignParams(task_tile=4096)
    regions = [task_region(Plan((4, side, side), params), (4096, 4096, 4096, 4096)) for side in (16384, 65536)]
    assert regions[0].shape == regions[1].shape
    assert max(regions[0].shape) <= 4096 + 2 * (params.tile + 4 * params.smoothing + params.stride)


@pytest.mark.e2e
def test_a_tiled_estimate_equals_the_untiled_one_without_seams(estimated):
    whole, tiled = estimated
    assert len(tiled.plan.tiles()) == 4 and len(whole.plan.tiles()) == 1
    regions = [task_region(tiled.plan, tile) for tile in tiled.plan.tiles()]
    assert all(max(region.shape) < SHAPE[1] for region in regions)  # a task reads part of a section
    assert tiled.stage_done("estimate").shape == (2 * 4,) and tiled.stage_done("estimate").all()
    assert tiled.array("fields/relative").chunks == (1, 2, 8, 8)
    reference = fields(whole, "relative")
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(fields(tiled, "relative"), reference, atol=1e-3)


@pytest.mark.e2e
def test_the_stitch_in_tiles_equals_the_serial_stitch(estimated):
    whole, tiled = estimated
    whole.array("fields/relative")[:] = fields(tiled, "relative")  # the same input for both stitches
    for ws in (whole, tiled):
        run_stage("stitch", ws, **STAGE)
    assert tiled.stage_done("stitch").shape == (4,) and tiled.stage_done("stitch").all()
    reference = fields(whole, "stitched")
    assert np.abs(reference).max() > 1.0
    np.testing.assert_allclose(fields(tiled, "stitched"), reference, atol=1e-4)


@pytest.mark.e2e
def test_a_tiled_estimate_resumes_with_only_its_unfinished_block_tile_tasks(estimated, monkeypatch):
    _, tiled = estimated
    before = fields(tiled, "relative")
    unfinished = [tiled.plan.task_index(0, 2), tiled.plan.task_index(1, 3)]
    markers = tiled.array("stages/estimate")
    for index in unfinished:
        markers[index] = False
    calls = []

    def recording(ws, stack, index, tile, **kwargs):
        calls.append((index, tile))
        return unpatched(ws, stack, index, tile, **kwargs)

    unpatched = estimate.estimate_block
    monkeypatch.setattr(estimate, "estimate_block", recording)
    assert run_stage("estimate", tiled, "3:6", **STAGE) == "estimate: 1 block(s) done in 4 xy tiles"
    assert calls == [(1, 3)]  # --z-range: only the second block
    run_stage("estimate", tiled, **STAGE)
    assert calls == [(1, 3), (0, 2)]
    assert tiled.stage_done("estimate").all()
    np.testing.assert_array_equal(fields(tiled, "relative"), before)


def test_no_stage_reads_more_than_a_bounded_part_of_a_larger_section(tmp_path, monkeypatch):
    """prealign, estimate, refine, polish, render and qc read their sections part by part (parts of 32 px here; the
    estimate in task tiles of 64 px, warped in strips of 32^2 px; the polish in bands of patch-grid nodes; the render
    one 32 px shard at a time; the qc in bands of 16 rows), never a whole 224 x 224 section, and only those parts are
    read from the TIFF holding them."""
    import emalign.io as io
    import emalign.pipeline.polish as polish
    import emalign.pipeline.qc as qc
    import emalign.pipeline.render as render

    shape = (3, 224, 224)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, demo_stack(shape, seed=2)[1].stack, photometric="minisblack")
    monkeypatch.setattr(io, "SECTION_CHUNKS", (1, 16, 16))
    monkeypatch.setattr(io, "DASK_XY", 32)
    monkeypatch.setattr(estimate, "COARSE_TILE", 32)
    monkeypatch.setattr(render, "RENDER_PIXELS", 32 * 32)
    monkeypatch.setattr(polish, "POLISH_NODES", 2)
    monkeypatch.setattr(qc, "QC_BAND", 16 * 224)
    asked, read = [], []

    def asking(stack, z, require_finite=True, region=None):
        assert region is not None, "a whole section was asked for"
        asked.append((region[0].stop - region[0].start) * (region[1].stop - region[1].start))
        return check_chunk(stack, z, require_finite, region)

    def reading(*args):
        rows, cols = args[-2:]
        read.append((rows.stop - rows.start) * (cols.stop - cols.start))
        return read_raw_region(*args)

    check_chunk, read_raw_region = estimate.check_chunk, io._read_raw_region
    for module in (estimate, render, qc):
        monkeypatch.setattr(module, "check_chunk", asking)
    monkeypatch.setattr(io, "_read_raw_region", reading)  # what is read from the file
    params = AlignParams(block=2, tile=32, halo=4, smoothing=4.0, task_tile=64, shard=32, polish="on", polish_patch=16)
    ws = Workspace.create(open_stack(path), tmp_path / "out.zarr", params)
    read.clear()  # the pixel size's estimate reads central crops of at most ESTIMATE_CROP px, whole here
    for stage in ("prealign", "estimate", "stitch", "refine", "polish", "render", "qc"):
        run_stage(stage, ws, **STAGE)
    assert ws.writer.done_sections().all() and ws.writer.tile_side() == 32
    # a part and what it pulls from, widened to whole 32 px contrast blocks and a few px (estimate._widened)
    assert max(asked) < shape[1] * shape[2] / 2
    assert max(read) < shape[1] * shape[2] / 2 and sum(read) > shape[0] * shape[1] * shape[2]


def test_the_qc_grid_is_every_4th_pixel_to_8192_px_then_2048_points_a_side_read_in_bands_of_rows(tmp_path, monkeypatch):
    import emalign.pipeline.qc as qc

    assert [qc.sample_step((3, side, 500)) for side in (448, 8192, 8193, 32768)] == [4, 4, 5, 16]
    data = np.random.default_rng(0).integers(0, 255, (2, 101, 70), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", data, photometric="minisblack", compression="zlib", rowsperstrip=8)
    monkeypatch.setattr(qc, "QC_BAND", 20 * 70)  # bands of 20 rows, a multiple of the step
    np.testing.assert_array_equal(qc.sampled(open_stack(tmp_path / "stack.tif"), 1, 5), data[1, ::5, ::5])


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_a_section_read_in_parts_gives_the_whole_sections_block_means_and_statistics(tmp_path, monkeypatch, factor):
    import zarr

    from emalign.downsample import block_mean

    rng = np.random.default_rng(1)
    data = (rng.random((1, 200, 234)) * 200 + 20).astype(np.uint8)
    data[0, :40, :90] = 0
    data[0, 100:130, 20:200] = 255  # a saturated run across parts
    data[0, 150:190, 150:190] = 128  # featureless
    zarr.open_array(str(tmp_path / "s.zarr"), mode="w", shape=data.shape, chunks=(1, 64, 64), dtype=np.uint8)[:] = data
    stack = open_stack(tmp_path / "s.zarr")
    monkeypatch.setattr(estimate, "COARSE_TILE", 60)  # parts of 64 or 96 px
    typical, (fraction, contrast) = estimate.section_contrast(stack, 0, factor)
    coarse = estimate.coarse_section(stack, 0, factor, typical)
    raw, whole = estimate.read_masked(stack, 0)
    np.testing.assert_array_equal(coarse, block_mean(whole, factor, nodata=True))
    grid = raw[::factor, ::factor]
    values = grid[grid != 0].astype(np.float64)
    assert fraction == pytest.approx((grid != 0).mean(), rel=1e-12)
    assert contrast == pytest.approx(values.std() / values.max(), rel=1e-9)


def test_the_memory_per_task_sets_the_task_tiles_and_the_prealignments_resolution_of_large_sections():
    plans = {gib: Plan((6, 8192, 8192), AlignParams(memory_per_task=gib)) for gib in (1.0, 2.0, 4.0)}
    tiles = [plans[gib].task_tile for gib in (1.0, 2.0, 4.0)]
    factors = [plans[gib].coarse_factor for gib in (1.0, 2.0, 4.0)]
    assert tiles == sorted(tiles) and tiles[0] < tiles[-1] and factors == sorted(factors, reverse=True)
    assert all(min(t[2] for t in plan.tiles()) > plan.task_tile / 2 for plan in plans.values())  # no sliver at the edge
    small = Plan((6, 448, 448), AlignParams(memory_per_task=1.0))
    assert small.coarse_factor == AlignParams().coarse_downsample and len(small.tiles()) == 1
    assert Plan((6, 8192, 8192), AlignParams(task_tile=4096)).task_tile == 4096  # an explicit tile wins
    with pytest.raises(EmalignError, match="memory-per-task"):
        AlignParams(memory_per_task=0).validate()
