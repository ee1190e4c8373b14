"""The notebooks run end to end (at the small size their parameters cell picks when
FLAX_ATTENTION_NOTEBOOK_SMALL=1), so they cannot rot; the committed files carry no outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = tuple(sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert "FLAX_ATTENTION_NOTEBOOK_SMALL" in code[0].source  # the parameters cell


# The quickstart runs by default; the longer notebooks (about a minute each) under -m slow.
@pytest.mark.parametrize("name", [n if n == "quickstart.ipynb" else
                                  pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("FLAX_ATTENTION_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert outputs
