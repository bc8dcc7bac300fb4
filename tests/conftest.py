"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Give each network task one torch thread (the pipeline gives it cores // workers).

    Results do not depend on it; speed does: on a CPU shared with other work, 2 OpenMP threads per
    task measured up to 60x slower than 1.
    """
    import emalign.pipeline.run as pipeline

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "cores", lambda: 1)
        yield
