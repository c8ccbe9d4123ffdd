"""docs/tour.ipynb, the notebook of the Python API, runs: every cell, at tiny sizes (VAE_CLI_TOUR=tiny),
from its jupytext source docs/tour.py, which the committed notebook must match cell for cell."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

DOCS = Path(__file__).resolve().parents[1] / "docs"


def sources(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_the_committed_notebook_is_its_source():
    committed = nbformat.read(DOCS / "tour.ipynb", as_version=4)
    assert sources(committed) == sources(jupytext.read(DOCS / "tour.py")), "run `make tour` to pair them again"
    assert any(cell.get("outputs") for cell in committed.cells if cell.cell_type == "code")  # it reads without running


@pytest.mark.notebook
def test_every_cell_of_the_tour_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_CLI_TOUR", "tiny")
    notebook = jupytext.read(DOCS / "tour.py")
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" for o in outputs)  # the figures were drawn
