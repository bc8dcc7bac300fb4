"""The accuracy harness (emalign/evaluate.py): baselines and the evaluate loop on small synthetic stacks."""

import numpy as np
import pytest

from emalign import evaluate, synth
from emalign.synth import em_texture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stack():
    return em_texture((8, 96, 96), seed=3, z_step=2.0)


@pytest.mark.e2e
def test_baselines_reduce_the_misalignment_and_no_alignment_does_not(stack):
    pytest.importorskip("skimage", reason="scikit-image (the `bench` extra) gives the TV-L1 baseline")
    aligners = {"none": evaluate.no_alignment, "rigid": evaluate.rigid_chain_fields, "tvl1": evaluate.tvl1_chain}
    results = evaluate.evaluate(stack, aligners, seed=2)
    assert results["rigid"]["rms"] < 0.5 * results["none"]["rms"]
    assert results["tvl1"]["adj"] < 0.5 * results["none"]["adj"]
    assert all(r["seconds"] >= 0 and r["mpx_per_s"] > 0 for r in results.values())


@pytest.mark.e2e
def test_elastix_chain_reduces_the_section_to_section_misalignment(stack):
    pytest.importorskip("itk", reason="itk-elastix (the `bench` extra) gives the elastix baseline")
    results = evaluate.evaluate(stack, {"none": evaluate.no_alignment, "elastix": evaluate.elastix_chain}, seed=2)
    assert results["elastix"]["adj"] < 0.5 * results["none"]["adj"], results


@pytest.mark.e2e
def test_sofima_anchor_corrects_part_of_the_section_scaling_the_rigid_chain_leaves():
    pytest.importorskip("sofima", reason="SOFIMA, installed from its repository, runs the anchor")
    scaled = em_texture((4, 512, 512), seed=3, z_step=2.0)
    misalignment = {"shift": 5.0, "rotation_deg": 0.5, "scale": 0.02, "elastic": 0.0}
    aligners = {"rigid": evaluate.rigid_chain_fields, "sofima": evaluate.sofima_chain}
    results = evaluate.evaluate(scaled, aligners, seed=2, misalignment=misalignment)
    assert results["sofima"]["adj"] < 0.85 * results["rigid"]["adj"], results


def test_an_aligned_stack_is_left_as_it_is_by_no_alignment(stack):
    results = evaluate.evaluate(stack, {"none": evaluate.no_alignment}, misalignment=evaluate.NO_MISALIGNMENT)
    assert results["none"]["rms"] == pytest.approx(0.0, abs=1e-6)


def test_markdown_table_has_a_row_per_method(stack):
    results = evaluate.evaluate(stack, {"none": evaluate.no_alignment, "rigid": evaluate.rigid_chain_fields})
    table = evaluate.markdown_table(results, "title")
    assert table.startswith("**title**") and "| none |" in table and "| rigid |" in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 3


def test_torn_section_error_is_zero_when_a_section_moves_with_its_neighbours_and_counts_a_jump():
    residual = np.zeros((5, 2, 40, 40), np.float32)
    residual[1:4] = 2.0  # sections 1-3 share one offset: each lines up with the mean of its neighbours
    assert evaluate.torn_section_error(residual, [2]) == pytest.approx(0.0)
    residual[2, 1, 20:] += 3.0  # the lower piece of section 2 is left 3 px off in x
    interior = np.zeros((40, 40))
    interior[20:] = 3.0
    expected = np.sqrt(np.mean(interior[4:36, 4:36] ** 2))
    assert evaluate.torn_section_error(residual, [2]) == pytest.approx(expected)


def test_evaluate_watches_the_torn_sections(stack):
    results = evaluate.evaluate(stack, {"none": evaluate.no_alignment}, artifacts=("crack",))
    assert results["none"]["torn_adj"] > 5.0  # unaligned: the misalignment itself
    torn = synth.misalign(stack, artifacts=("crack",)).flags.index("crack")
    assert results["none"]["torn_sections"] == (torn,)
    assert "torn_adj" not in evaluate.evaluate(stack, {"none": evaluate.no_alignment})["none"]


def test_remove_section_offsets_undoes_whole_pixel_section_jumps():
    aligned = em_texture((6, 120, 120), seed=5, z_step=1.0)
    placed = np.cumsum([[0, 0], [0, 0], [9, -12], [0, 0], [-5, 3], [0, 0]], axis=0)  # content moved down / right
    canvas = np.zeros((6, 160, 160), np.uint8)
    for z, (dy, dx) in enumerate(placed):
        canvas[z, 20 + dy : 140 + dy, 20 + dx : 140 + dx] = aligned[z]
    repaired, offsets = evaluate.remove_section_offsets(canvas, search=16)
    assert np.array_equal(offsets - offsets[0], placed)
    assert repaired.shape == (6, 160 - 9, 160 - 12)  # the area every section covers
    oy, ox = 20 + placed[0] - (offsets[0] - offsets.min(axis=0))  # where the content starts, the same in every z
    top, left = max(oy, 0), max(ox, 0)
    assert np.array_equal(repaired[:, top : oy + 120, left : ox + 120], aligned[:, top - oy :, left - ox :])


def test_write_tiff_stores_the_voxel_size_that_the_reader_finds(tmp_path, stack):
    from emalign.io import open_stack

    evaluate.write_tiff(tmp_path / "calibrated.tif", stack, (40.0, 4.0, 4.0))
    evaluate.write_tiff(tmp_path / "plain.tif", stack)
    calibrated = open_stack(tmp_path / "calibrated.tif")
    assert calibrated.voxel_size == pytest.approx((40.0, 4.0, 4.0)) and calibrated.unit == "nanometer"
    assert np.array_equal(np.asarray(calibrated.data), stack)
    assert open_stack(tmp_path / "plain.tif").voxel_size == (1.0, 1.0, 1.0)


def test_fail_counts_residuals_above_the_given_threshold(stack):
    shifted = {"shift": 0.0, "rotation_deg": 0.0, "scale": 0.0, "elastic": 3.0}
    loose = evaluate.evaluate(stack, {"none": evaluate.no_alignment}, misalignment=shifted)["none"]["fail"]
    strict = evaluate.evaluate(stack, {"none": evaluate.no_alignment}, misalignment=shifted, fail_px=1.0)["none"]
    assert loose == 0.0 and strict["fail"] > 0.2


def test_mean_range_gives_the_mean_and_the_extremes_in_the_given_unit():
    assert evaluate.mean_range([1.0, 2.0, 6.0]) == "3.00 (1.00-6.00)"
    assert evaluate.mean_range([0.5, 1.5], unit=4.0) == "4.00 (2.00-6.00)"
    assert evaluate.mean_range([0.5]) == "0.50"
