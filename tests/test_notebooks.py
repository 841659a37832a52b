"""The notebooks run top to bottom at their small size and are stored clean."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")

# notebook -> strings its printed output must contain, and how many plots it must show
EXPECTED = {
    "01_quickstart.ipynb": (
        ["small", "CLAIR:", "clients flagged", "sign_flip", "nonfinite"], 0),
    "02_text_copy.ipynb": (
        ["| small", "| **clair** |", "| fedavg |", "detection:"], 4),
}


def read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_stored_without_outputs(name):
  nb = read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None
  install = next(c.source for c in code if "pip" in c.source)
  assert '"google.colab" in sys.modules' in install  # installs only on Colab


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes_at_small_size(name, monkeypatch, tmp_path):
  monkeypatch.setenv("CLAIR_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = read(name)
  client = NotebookClient(
      nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  text = "\n".join(out.get("text", "") for out in outputs)
  expected_text, expected_images = EXPECTED[name]
  for snippet in expected_text:
    assert snippet in text
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) >= expected_images
