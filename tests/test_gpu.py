"""The CUDA path: the same alignment as the CPU's within bfloat16's precision (skipped without a GPU), and the
GPU benchmark script itself, run on the CPU so that a session with a GPU finds it working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from emalign import register_sections
from emalign.fields import resample, sample
from emalign.shared_data import FLYEM, SHARED_DATA
from emalign.synth import demo_stack

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCHMARK = BENCHMARKS / "gpu.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="module")
def cpu_and_gpu():
    stack = demo_stack((8, 192, 192), seed=5)[1].stack
    return register_sections(stack, device="cpu"), register_sections(stack, device="cuda")


@pytest.mark.e2e
@needs_cuda
def test_fields_on_the_gpu_equal_the_cpus_within_a_twentieth_of_a_pixel(cpu_and_gpu):
    cpu, gpu = cpu_and_gpu
    assert np.sqrt(np.mean(np.sum((cpu.fields - gpu.fields) ** 2, axis=1))) <= 0.05


@pytest.mark.e2e
@needs_cuda
def test_the_gpus_output_matches_the_cpus_within_one_grey_level_on_999_per_mille(cpu_and_gpu):
    cpu, gpu = cpu_and_gpu
    difference = np.abs(cpu.aligned.astype(np.int32) - gpu.aligned.astype(np.int32))
    assert np.mean(difference <= 1) >= 0.999


@needs_cuda
def test_a_field_upsampled_and_an_image_warped_on_the_gpu_equal_the_cpus():
    rng = np.random.default_rng(0)
    field = rng.normal(0, 3, (2, 20, 24)).astype(np.float32)
    image = rng.uniform(0, 255, (150, 180)).astype(np.float32)
    on = {device: resample(field, 8, 1, (150, 180), origin=(4, 8), device=device) for device in ("cpu", "cuda")}
    np.testing.assert_allclose(on["cuda"], on["cpu"], atol=1e-4)
    coords = on["cpu"] + np.indices((150, 180), dtype=np.float32)
    np.testing.assert_allclose(sample(image, coords, device="cuda"), sample(image, coords), atol=1e-2)


@pytest.mark.e2e
def test_the_gpu_benchmark_script_runs_through_and_writes_its_table_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    command = [sys.executable, str(BENCHMARK), "--device", "cpu", "--sizes", "96:4", "--compare", "4x96"]
    subprocess.run([*command, "--accuracy", "6x96:1", "--out", str(out)], check=True, capture_output=True, text=True)
    table = out.read_text()
    assert "| 4 x 96 x 96 |" in table and "torch" in table and "| emalign align --device cpu |" in table
    assert "global fields differ by 0.000 px RMS; 100.00 % of output pixels within 1 grey level" in table


@pytest.mark.e2e
@pytest.mark.skipif(not (SHARED_DATA / FLYEM[1]).exists(), reason=f"needs the FlyEM stacks in {SHARED_DATA}")
def test_the_gpu_training_script_trains_both_stages_and_measures_the_new_weights_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_train.md"
    command = [sys.executable, str(BENCHMARKS / "gpu_train.py"), "--device", "cpu", "--minutes", "0.2"]
    options = ["--batch", "2", "--crop", "64", "--sections", "8", "--seeds", "1", "--out", str(out)]
    subprocess.run([*command, *options], check=True, capture_output=True, text=True)
    table = out.read_text()
    assert "stage 1 (from scratch)" in table and "stage 2 (the pipeline's task)" in table
    assert "| 40 nm, 8 sections | faemreg-wide |" in table and "| 10 nm, 8 sections | faemreg-small |" in table
    assert (tmp_path / "faemreg-wide.pt").stat().st_size > 0
