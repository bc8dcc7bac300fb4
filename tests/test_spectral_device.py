"""The phase-correlation core on a torch device: spectra stay where they were made, small results come back as
numpy, and a CUDA GPU gives the CPU's pairwise matrices (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emalign import affine, rigid
from emalign.patches import PatchGrid
from emalign.synth import demo_stack, em_texture

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_spectra_stay_on_the_device_of_their_images_and_peaks_come_back_as_numpy(device):
    images = torch.as_tensor(em_texture((2, 64, 64), seed=0).astype(np.float32), device=device)
    spectra, magnitude, blank = rigid.whitened_spectra(images, None, rigid.LOWPASS)
    assert spectra.device == magnitude.device == images.device
    assert spectra.dtype == torch.complex64 and spectra.shape == (2, 64, 33)
    assert isinstance(blank, np.ndarray) and not blank.any()
    shifts, peaks = rigid.correlation_peaks(spectra[:1], spectra, (64, 64), 10)
    assert isinstance(shifts, np.ndarray) and shifts.dtype == np.float64 and shifts.shape == (2, 2)
    assert isinstance(peaks, np.ndarray) and peaks.dtype == np.float64 and peaks.shape == (2,)
    assert peaks[0] == pytest.approx(1.0, abs=1e-4) and np.abs(shifts[0]).max() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_patch_and_section_spectra_are_made_on_the_requested_device(device):
    image = em_texture((1, 128, 128), seed=1)[0].astype(np.float32)
    image[:, :48] = 0  # the left patches hold too little data: their spectra are zero
    grid = PatchGrid.for_shape(image.shape, 64)
    spectra = grid.spectra(image, device=device)
    assert spectra.device.type == device and spectra.dtype == torch.complex64
    assert (spectra[0] == 0).all() and (spectra[-1] != 0).any()
    shifts, peaks = grid.match(spectra, spectra)
    assert isinstance(shifts, np.ndarray) and shifts.shape == (*grid.shape, 2) and peaks[0, 0] == 0
    section = rigid._Section(image, rigid.LOWPASS, device)
    assert section.spectrum.device.type == device and section.patches()[2].device.type == device


@needs_cuda
def test_pairwise_rigid_and_affine_on_cuda_give_the_cpus_matrices_within_a_hundredth_of_a_pixel():
    stack = demo_stack((6, 192, 192), seed=3)[1].stack
    kwargs = dict(downsample=1, max_rotation_deg=10, refine_steps=1, second_opinion=rigid.SECOND_OPINION_MARGIN)
    corners = np.array([[0, 0, 1], [0, 191, 1], [191, 0, 1], [191, 191, 1]], float)

    def pairwise(device: str) -> list[tuple[int, int, np.ndarray, float]]:
        pairs = rigid.pairwise_rigid(stack, device=device, **kwargs)
        return pairs + affine.pairwise_affine(stack, pairs, 1, device=device)

    for (_, _, matrix, score), (_, _, cpu_matrix, cpu_score) in zip(pairwise("cuda"), pairwise("cpu"), strict=True):
        assert np.abs(corners @ (matrix - cpu_matrix).T).max() <= 0.01
        assert score == pytest.approx(cpu_score, abs=1e-4)


def test_matches_on_the_cpu_do_not_depend_on_the_threads_of_their_task():
    stack = demo_stack((5, 192, 192), seed=4)[1].stack
    grid = PatchGrid.for_shape(stack.shape[1:], 32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            pairs = rigid.pairwise_rigid(stack, (1, 2), downsample=1)
            affines = [matrix for *_, matrix, _ in affine.pairwise_affine(stack, pairs, 1)]
            patches = grid.match(grid.spectra(stack[0]), grid.spectra(stack[1]))[0]
            results.append(np.concatenate([np.ravel(affines), patches.ravel()]))
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(results[0], results[1])


def test_spectra_and_peaks_taken_in_passes_equal_those_taken_at_once(monkeypatch):
    images = torch.as_tensor(em_texture((5, 64, 64), seed=2).astype(np.float32))
    images[3] = 0  # a blank image among them
    weights = torch.as_tensor(np.stack([rigid.soft_mask(image) for image in images.numpy()]))
    at_once = rigid.whitened_spectra(images, weights, rigid.LOWPASS)
    peaks_at_once = rigid.correlation_peaks(at_once[0][:1], at_once[0], (64, 64), 10)
    monkeypatch.setattr(rigid, "PASS_PIXELS", 2 * 64 * 64)  # passes of two images, the last of one
    in_passes = rigid.whitened_spectra(list(images), list(weights), rigid.LOWPASS)
    assert torch.equal(in_passes[0], at_once[0]) and torch.equal(in_passes[1], at_once[1])
    assert np.array_equal(in_passes[2], at_once[2]) and in_passes[2].tolist() == [False, False, False, True, False]
    peaks_in_passes = rigid.correlation_peaks(in_passes[0][:1], in_passes[0], (64, 64), 10)
    assert all(np.array_equal(a, b) for a, b in zip(peaks_in_passes, peaks_at_once, strict=True))
