"""Executes every notebook under notebooks/ top to bottom (their reduced sizes) with nbclient.

ERNIE5_NOTEBOOK_STEPS shortens each run; ERNIE5_NOTEBOOK_WORKDIR is one directory for all
of them, so that the notebook that analyses a trained model (routing_analysis) reuses the
quick start's checkpoint when it is there (else it trains one).
A notebook fails its test when a cell raises, or when the result it exists to show is not
printed (MARKERS).
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Text each notebook prints once its last cell has run.
MARKERS = {"elastic_family.ipynb": "sub-models beating the static truncation",
           "quickstart.ipynb": "exported depth=2,experts=4,top_k=1",
           "routing_analysis.ipynb": "entropy text:",
           "m2cp.ipynb": "point->view retrieval precision",
           "ernie45_import.ipynb": "exported sub-model",
           "rl_post_training.ipynb": "with router replay vs"}
CI_STEPS = "3"


@pytest.fixture(scope="session")
def notebook_workdir(tmp_path_factory):
  """One workdir for every notebook of this pytest run (shared by xdist workers)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # Each worker's basetemp is under the run's.
    base = base.parent
  path = base / "notebooks"
  path.mkdir(exist_ok=True)
  return str(path)


def test_every_notebook_has_a_marker():
  assert sorted(MARKERS) == sorted(p.name for p in NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_workdir, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("ERNIE5_NOTEBOOK_STEPS", CI_STEPS)
  monkeypatch.setenv("ERNIE5_NOTEBOOK_WORKDIR", notebook_workdir)
  # XLA's persistent cache, shared by the notebooks' kernels: the tiny model's programs
  # (train step, eval sums, routing) recur across notebooks and across the eval job's calls.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(notebook_workdir, "jax_cache"))
  # The notebook's directory as its cwd, as Jupyter or Colab opens it.
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "notebooks")}})
  client.execute()  # Raises CellExecutionError naming the failing cell.
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not any(o.get("output_type") == "error" for o in outputs)
  assert any(MARKERS[path.name] in o.get("text", "") for o in outputs)
