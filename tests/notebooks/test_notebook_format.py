"""The committed notebooks: parameters cells, kernel, renderer, no stale outputs, public APIs."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import papermill
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
EXPECTED = [
    "01_natural_gradient.ipynb",
    "02_structures.ipynb",
    "03_half_precision_stability.ipynb",
    "04_sweep_report.ipynb",
]
NOTEBOOKS = [NOTEBOOKS_DIR / n for n in EXPECTED if (NOTEBOOKS_DIR / n).exists()]


def _code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_all_four_notebooks_are_committed() -> None:
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_carries_only_outputs_that_nbval_checks(path: Path) -> None:
    for cell in _code_cells(path):
        checked = "NBVAL_CHECK_OUTPUT" in cell.source
        assert not cell.outputs or checked, f"stale outputs in cell:\n{cell.source[:200]}"
        if checked:  # nbval --nbval-lax compares these against what a fresh run prints
            assert cell.outputs, f"checked cell without reference output:\n{cell.source[:200]}"
            for out in cell.outputs:
                assert out.output_type == "stream", "only printed text is a stable output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_with_typed_documented_values(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = papermill.inspect_notebook(str(path))
    assert params
    for name, spec in params.items():
        assert spec["inferred_type_name"] not in ("None", ""), f"{name} has no type annotation"
        assert spec["help"].strip(), f"{name} has no comment saying what it means"
    # the cell after the parameters validates them
    index = nb.cells.index(tagged[0])
    assert "raise ValueError" in nb.cells[index + 1].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_python3_kernel_and_an_exportable_plotly_renderer(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    source = "\n".join(c.source for c in _code_cells(path))
    assert 'pio.renderers.default = "plotly_mimetype+notebook"' in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_no_private_names(path: Path) -> None:
    source = "\n".join(c.source for c in _code_cells(path))
    imports = re.findall(r"^\s*(?:from\s+(\S+)\s+)?import\s+(.+)$", source, flags=re.M)
    for module, names in imports:
        assert not any(part.startswith("_") for part in (module or "").split(".")), module
        for name in re.split(r"[,\s()]+", names):
            assert not name.startswith("_"), f"private import {name!r} from {module}"
    assert not re.search(r"\.state\[|\._[a-z]", source.replace("self._", "")), "private access"
