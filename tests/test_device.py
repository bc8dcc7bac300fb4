"""Device choice: one GPU per worker process, and the GPU path's reading ahead, checked on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emalign import models
from emalign.device import release_freed_memory, reuse_freed_memory, worker_device
from emalign.inference import predict_windows
from emalign.synth import demo_stack


@pytest.mark.parametrize(
    ("device", "worker", "gpus", "expected"),
    [
        ("auto", 0, 4, "cuda:0"),
        ("cuda", 5, 4, "cuda:1"),
        ("auto", "SLURMCluster-3", 2, "cuda:1"),
        ("cuda:2", 1, 4, "cuda:2"),  # a GPU the user named stays
        ("cpu", 1, 4, "cpu"),
        ("auto", 3, 1, "auto"),  # one GPU (or a SLURM job given one): nothing to choose
        ("auto", None, 4, "auto"),  # not on a dask worker
        ("auto", "scheduler", 4, "auto"),  # a name without a number
    ],
)
def test_each_numbered_worker_process_takes_its_own_gpu_in_turn(device, worker, gpus, expected):
    assert worker_device(device, worker, gpus) == expected


def test_reading_the_next_windows_ahead_gives_the_same_fields():
    model = models.load(models.DEFAULT_MODEL, torch.device("cpu"))
    depth = model.config.depth
    stack = demo_stack((depth + 2, 160, 160), seed=2)[1].stack.astype(np.float32)
    windows = np.stack([stack[i : i + depth] for i in range(3)])
    cpu = torch.device("cpu")
    ahead = predict_windows(model, windows, cpu, tile=96, halo=16, batch=2, prefetch=True)
    inline = predict_windows(model, windows, cpu, tile=96, halo=16, batch=2, prefetch=False)
    assert ahead.shape == (3, 2, 160, 160)
    np.testing.assert_array_equal(ahead, inline)


@pytest.mark.skipif(not reuse_freed_memory(), reason="needs glibc's mallopt (Linux)")
def test_the_heap_a_task_freed_is_handed_back_to_the_os():
    def resident_mib() -> float:
        with open("/proc/self/status") as status:
            return int(status.read().split("RssAnon:")[1].split()[0]) / 1024

    blocks = [np.ones(2**20) for _ in range(64)]  # 512 MiB in 8 MiB blocks: kept on the heap when freed
    keep = np.ones(16)  # allocated last, above the freed blocks: the heap cannot just shrink from its top
    del blocks
    before = resident_mib()
    release_freed_memory()
    assert before - resident_mib() > 400 and keep.sum() == 16
