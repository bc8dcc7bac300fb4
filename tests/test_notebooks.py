"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh kernel of this Python) and save their plots.

Each runs in a temporary folder: ``EMALIGN_NOTEBOOK_OUT`` points its outputs there, and the figures it
promises must be written as real PNG pictures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FIGURES = {
    "01_quickstart": ["quickstart_sections.png", "quickstart_reslice.png", "quickstart_metrics.png"],
    "02_train_your_model": ["train_history.png", "train_comparison.png"],
    "03_volumetric": ["volumetric_slices.png", "volumetric_errors.png"],
}
SECONDS = 120  # per cell; each notebook takes well under a minute on 2 cores


def _kernel_named_for_this_python(folder: Path, monkeypatch) -> str:
    """A kernelspec that runs this interpreter (not whatever ``python`` is first on PATH); returns its name."""
    name = "emalign-tests"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(folder))
    return name


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_top_to_bottom_and_saves_its_plots(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip(
        "nbformat", reason="the notebook runner is in the test extra: pip install -e '.[test]'"
    )
    nbclient = pytest.importorskip(
        "nbclient", reason="the notebook runner is in the test extra: pip install -e '.[test]'"
    )
    import matplotlib.image

    out = tmp_path / "out"
    monkeypatch.setenv("EMALIGN_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    kernel = _kernel_named_for_this_python(tmp_path / "jupyter", monkeypatch)
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(
        notebook, timeout=SECONDS, kernel_name=kernel, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    seconds = time.perf_counter() - start
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for figure in FIGURES[name]:
        path = out / "figures" / figure
        assert path.exists(), f"{name} did not save {figure}"
        picture = matplotlib.image.imread(path)
        assert picture.shape[0] > 100 and np.std(picture[..., :3]) > 0.05, f"{figure} is blank"
    assert seconds < 4 * 60, f"{name} took {seconds:.0f} s"
