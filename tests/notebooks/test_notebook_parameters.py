"""Notebooks run however papermill starts them: from any working directory, and with a list
parameter given as one value (``-p optimizers adamw``)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]


def test_notebook_04_runs_its_demo_sweep_from_the_repository_root(tmp_path):
    import papermill

    out = tmp_path / "nb04"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "04_sweep_report.ipynb"),
        str(tmp_path / "04.ipynb"),
        parameters={"sweep_dir": "", "out_dir": str(out)},
        kernel_name="python3",
        cwd=str(REPO),  # not notebooks/: relative paths would miss notebook 03
        progress_bar=False,
    )
    claims = json.loads((out / "results.json").read_text())["claims"]
    assert claims["combinations"] == 2 and claims["failed"] == 0, claims
    assert (out / "04_demo_sweep" / "report.html").is_file()
    assert not (REPO / "04_demo_sweep").exists() and not (REPO / "runs" / "04_demo_sweep").exists()


def _validate(notebook: str, **parameters: object) -> dict:
    """Run a notebook's parameters cell, papermill's injected values and its validation cell
    (the two cells after the tagged one) in a plain namespace; return the namespace."""
    nb = nbformat.read(REPO / "notebooks" / notebook, 4)
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    ns: dict = {}
    exec(nb.cells[i].source, ns)
    ns.update(parameters)
    exec(nb.cells[i + 1].source, ns)
    return ns


@pytest.mark.parametrize(
    ("notebook", "name", "value"),
    [("03_half_precision_stability.ipynb", "optimizers", "adamw"),
     ("02_structures.ipynb", "structures", "dense")],
)  # fmt: skip
def test_list_parameters_take_one_value_as_a_one_element_list(notebook, name, value):
    assert _validate(notebook, **{name: value})[name] == [value]
    with pytest.raises(ValueError, match=rf"-y '{name}: \["):  # the message shows the list form
        _validate(notebook, **{name: 3})
