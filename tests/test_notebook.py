"""notebooks/inspect_crate.ipynb runs from top to bottom (with fewer training steps)."""

import os
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_inspect_crate_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv("CRATE_NOTEBOOK_STEPS", "30")
  monkeypatch.setenv("CRATE_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("CRATE_NOTEBOOK_DATA_DIR", str(tmp_path / "data"))
  notebook = nbformat.read(REPO / "notebooks" / "inspect_crate.ipynb", as_version=4)
  client = nbclient.NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  )
  client.execute()  # Raises CellExecutionError on any failing cell (its own checks included).
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
  assert "The pure functions reproduce every layer of the model." in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
  assert os.path.isdir(tmp_path / "run" / "checkpoints")
