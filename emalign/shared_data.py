"""The real EM stacks the tests, the benchmarks and training read: ``../shared/data`` beside the repository.

None of them is part of the package (see docs/evaluation.md for what they are and their terms); a reader
raises FileNotFoundError naming the path where the data is absent, so a caller can skip with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FLYEM = ("flyem_medulla_training_sample1.tif", "flyem_medulla_training_sample2.tif")
ISBI = "isbi2012_train_volume.tif"


def shared_stack(name: str, z_step: int = 1, sections: int | None = None, data_dir: Path | None = None) -> np.ndarray:
    """Every ``z_step``-th section of a stack in ../shared/data (FileNotFoundError if absent)."""
    import tifffile

    path = (data_dir or SHARED_DATA) / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: shared EM data not found")
    stack = tifffile.imread(path)[::z_step]
    return stack[:sections] if sections else stack


__all__ = ["FLYEM", "ISBI", "SHARED_DATA", "shared_stack"]
