"""Patch-wise translations on a grid of nodes (emalign.patches)."""

from __future__ import annotations

import numpy as np
import pytest

from emalign.fields import warp
from emalign.patches import PatchGrid, patch_starts
from emalign.synth import em_texture


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return em_texture((1, 160, 160), seed=3)[0].astype(np.float32) + 1.0  # no zeros: every pixel has data


@pytest.mark.parametrize(("length", "size", "spacing"), [(160, 64, 32), (250, 96, 48), (100, 96, 48), (40, 64, 32)])
def test_patches_cover_the_axis_from_its_first_to_its_last_pixel_at_most_spacing_and_a_half_apart(
    length, size, spacing
):
    starts = patch_starts(length, size, spacing)
    assert starts[0] == 0
    if length > size:
        assert starts[-1] + size == length
        assert np.all(np.diff(starts) <= 1.5 * spacing)
    else:
        assert list(starts) == [0]


def test_a_uniform_shift_is_found_at_every_node(image):
    grid = PatchGrid.for_shape(image.shape, 64)
    assert grid.shape == (4, 4)
    shift = np.array([1.3, -0.6], np.float32)
    moved = warp(image, np.broadcast_to(-shift[:, None, None], (2, *image.shape)).copy())  # content moved by +shift
    shifts, peaks = grid.match(grid.spectra(image), grid.spectra(moved))
    inner = (slice(1, -1), slice(1, -1))  # the outer patches lose a strip to the warp's no-data border
    np.testing.assert_allclose(shifts[inner], np.broadcast_to(shift, shifts[inner].shape), atol=0.1)
    assert peaks[inner].min() > 0.8


def test_a_patch_mostly_without_data_is_not_matched(image):
    grid = PatchGrid.for_shape(image.shape, 64)
    holed = image.copy()
    holed[:48, :48] = 0  # no data over three quarters of the first patch
    _, peaks = grid.match(grid.spectra(image), grid.spectra(holed))
    assert peaks[0, 0] == 0 and peaks[-1, -1] > 0.8


def test_node_values_interpolate_linearly_between_centres_and_stay_constant_beyond():
    grid = PatchGrid.for_shape((160, 160), 64)
    cy, cx = grid.centres()
    values = np.zeros((2, *grid.shape))
    values[1] = cx[None, :] * 0.01  # dx proportional to x between the outer centres
    field = grid.field(values, (21, 21), stride=8)  # samples at 0, 8, ..., 160 px
    x = np.arange(21) * 8.0
    expected = np.clip(x, cx[0], cx[-1]) * 0.01
    np.testing.assert_allclose(field[1], np.broadcast_to(expected, (21, 21)), atol=1e-6)
    assert np.all(field[0] == 0)
