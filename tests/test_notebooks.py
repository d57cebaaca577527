"""The notebooks (jupytext percent scripts in notebooks/) run top to bottom in quick mode through
nbclient and ipykernel, as a user would run them; each ends in assertions on its own numbers, so a
notebook whose results go wrong fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import child_env

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.py"))


def test_every_notebook_is_collected():
    assert len(NOTEBOOKS) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    import nbformat
    from nbclient import NotebookClient

    notebook = jupytext.read(path)
    assert not any(cell.get("outputs") for cell in notebook.cells)  # no stored outputs
    for name, value in child_env(A2IJAX_NOTEBOOK_QUICK="1", MPLBACKEND="Agg").items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    # experiments/notebooks_full.py records each notebook's `figures` (its checks cell) as JSON
    notebook.cells.append(nbformat.v4.new_code_cell("import json\nassert isinstance(figures, dict) and figures\n"
                                                    "json.dumps(figures)"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
