"""Every notebook executes top to bottom (offline, on the default model), so a broken one fails CI."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).parents[1] / "notebooks"
NOTEBOOKS = sorted([*FOLDER.glob("[0-9][0-9]_*.ipynb"), *FOLDER.glob("seed_*.ipynb")], key=lambda p: p.name)
"""The numbered notebooks, then one per design document (``seed_NN``); sorted by name, so the
``seed_`` ones run after 04_training_an_sae and reuse its SAE."""


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def notebook_out(tmp_path_factory):
    """One output folder for all notebooks, so later ones reuse the SAE the training notebook made."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, notebook_out, monkeypatch):
    monkeypatch.setenv("SAE_CORE_OUT", str(notebook_out))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
