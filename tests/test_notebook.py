"""notebooks/transformer_tour.ipynb runs top to bottom (tiny mode) and draws its pictures."""

from collections import Counter

import ipykernel  # noqa: F401  (the kernel the notebook runs in; a test dependency)
import nbclient
import nbformat

from tests.conftest import REPO

NOTEBOOK = REPO / "notebooks" / "transformer_tour.ipynb"
# Tagged cells and the images each must produce.
EXPECTED_IMAGES = {"plot-positions": 1, "plot-attention": 3, "plot-schedule": 2, "plot-curves": 1}


def test_tour_notebook_runs_in_tiny_mode(tmp_path, monkeypatch):
    # The kernel inherits this environment: tiny mode, a fresh work directory, and one CPU
    # device instead of the 8 simulated ones the other tests use.
    monkeypatch.setenv("TOUR_TINY", "1")
    monkeypatch.setenv("TOUR_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.delenv("TOUR_CORPUS", raising=False)  # the repository's own tiny corpus
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    images = Counter()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        pngs = sum("image/png" in out.get("data", {}) for out in cell.outputs)
        for tag in cell.metadata.get("tags", []):
            images[tag] += pngs
    assert dict(images) == EXPECTED_IMAGES
    assert (tmp_path / "workdir" / "metrics.jsonl").exists()
    text = "".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    assert "mode: tiny" in text and "beam (4):" in text
