"""Executed sweep/demo notebooks keep no ipywidgets state (tens of MB, useless offline)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from experiments.__main__ import main
from experiments.sweep import NOTEBOOK_FILE, run_sweep, strip_widget_state

WIDGET_BODY = """\
import ipywidgets
from IPython.display import display
display(ipywidgets.IntSlider(value=x))
"""


@pytest.fixture
def widget_notebook(tmp_path: Path) -> Path:
    """A notebook with a parameters cell that displays an ipywidget."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    params = nbformat.v4.new_code_cell('x: int = 3\nout_dir: str = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(WIDGET_BODY)]
    path = tmp_path / "widget.ipynb"
    nbformat.write(nb, path)
    return path


def _has_widget_view(nb: dict) -> bool:
    return any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        for c in nb["cells"]
        for o in c.get("outputs", [])
    )


def test_sweep_notebooks_have_no_stored_widget_state(widget_notebook: Path, tmp_path: Path):
    summary = run_sweep(widget_notebook, {"x": [1]}, tmp_path / "sweep", progress=False)
    assert summary["status"].tolist() == ["ok"]
    (executed,) = (tmp_path / "sweep").rglob(NOTEBOOK_FILE)
    nb = json.loads(executed.read_text())
    assert _has_widget_view(nb)  # the widget was displayed ...
    assert "widgets" not in nb["metadata"]  # ... but its state is not stored


def test_demo_notebook_has_no_stored_widget_state(widget_notebook: Path, tmp_path: Path):
    code = main(["demo", "--notebook", str(widget_notebook), "--out", str(tmp_path / "demo")])
    assert code == 0
    nb = json.loads((tmp_path / "demo" / widget_notebook.name).read_text())
    assert _has_widget_view(nb) and "widgets" not in nb["metadata"]


def test_strip_widget_state_removes_it_and_says_how_much(tmp_path: Path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {
        "application/vnd.jupyter.widget-state+json": {"state": {"a": "x" * 999}}
    }
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert strip_widget_state(path) > 999
    assert "widgets" not in nbformat.read(path, as_version=4).metadata
    assert strip_widget_state(path) == 0
