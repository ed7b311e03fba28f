"""The notebooks run top to bottom with small settings and draw their figures inline; the committed ones
carry their outputs, figures included, so they read as tutorials on GitHub and in JupyterLab."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DRAWS = re.compile(r"\bplots\.\w+\(|plt\.subplots\(")


def _images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def _drawing_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and DRAWS.search(c.source)]


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_its_figures(path, tmp_path, monkeypatch):
    monkeypatch.setenv("STEERKIT_NB_STEPS", "5")
    monkeypatch.setenv("STEERKIT_NB_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)  # the committed outputs are replaced cell by cell as it runs
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors  # the notebooks assert their own results (merged == direct, baked == hooked, ...)
    drawing = _drawing_cells(nb)
    assert drawing and all(_images(cell) >= 1 for cell in drawing)  # inline figures, not "<Figure size ...>"
    bare = [o for c in drawing for o in c.get("outputs", []) if "image/png" not in o.get("data", {})]
    assert not any("<Figure size" in o.get("data", {}).get("text/plain", "") for o in bare)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_their_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "run scripts/run_notebooks.py (make notebooks) and commit"
    assert all(_images(cell) >= 1 for cell in _drawing_cells(nb))
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(markdown) >= len(code) // 2  # reads as a tutorial, not a bare script
