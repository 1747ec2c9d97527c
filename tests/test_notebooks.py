"""Every notebook under notebooks/ runs top to bottom (on reduced sizes), so none can rot.

Each runs in a fresh kernel with ``RLX_OPTAX_NOTEBOOK_SMALL=1``; outputs are not written back:
the committed notebooks carry the outputs of a full-size run (plots included).
"""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 240  # per cell


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"quickstart", "optimizer_comparison", "stateful_api"} <= names


# Notebooks whose committed run must show at least one figure.
WITH_PLOTS = {"optimizer_comparison"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_executed_top_to_bottom_with_outputs(path):
    """The committed notebooks carry their full-size outputs (plots visible on GitHub): every
    code cell ran once, in order, without an error, and no output names a local path."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name
    outputs = [o for c in code for o in c.outputs]
    assert outputs, f"{path.name}: commit it executed"
    assert not [o for o in outputs if o.output_type == "error"], path.name
    text = nbformat.writes(nb)
    for local in ("/home/", "/tmp/", "/work/", "/Users/"):
        assert local not in text, f"{path.name} names a local path {local}"
    if path.stem in WITH_PLOTS:
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name}: no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("RLX_OPTAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
    assert os.environ["RLX_OPTAX_NOTEBOOK_SMALL"] == "1"
