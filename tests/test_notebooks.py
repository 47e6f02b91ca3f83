"""Executes every notebook under notebooks/ top to bottom (their reduced sizes) with nbclient."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  os.environ.setdefault("ERNIE5_NOTEBOOK_STEPS", "30")
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}})  # cwd: repo root
  client.execute()  # Raises CellExecutionError naming the failing cell.
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not any(o.get("output_type") == "error" for o in outputs)
  assert any("sub-models beating the static truncation" in o.get("text", "") for o in outputs)
