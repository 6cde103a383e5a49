"""Shared helpers for the notebook tests: locate notebooks and run them under papermill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def _execute(name: str, out: Path, **parameters: Any) -> None:
    """Run ``notebooks/<name>`` into ``out`` with ``parameters`` and ``out_dir=out``, as a
    sweep would (`experiments.sweep.execute_notebook`)."""
    from experiments.sweep import execute_notebook

    out.mkdir(parents=True, exist_ok=True)
    execute_notebook(
        NOTEBOOKS_DIR / name,
        out / name,
        parameters={**parameters, "out_dir": str(out)},
        kernel_name="python3",
        cwd=str(NOTEBOOKS_DIR),
        progress_bar=False,
    )


def _run_notebook(name: str, out: Path, **parameters: Any) -> dict[str, Any]:
    """Run ``notebooks/<name>`` with ``parameters`` (out_dir=out); return its results.json."""
    _execute(name, out, **parameters)
    return json.loads((out / "results.json").read_text())


def _failing_run(name: str, out: Path, **parameters: Any) -> str:
    """Execute a notebook that must fail; return the error text ('ename: evalue')."""
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as info:
        _execute(name, out, **parameters)
    return f"{info.value.ename}: {info.value.evalue}"


@pytest.fixture
def run_notebook():
    """``run_notebook(name, out, **parameters) -> results.json`` (papermill, out_dir=out)."""
    return _run_notebook


@pytest.fixture
def failing_run():
    """``failing_run(name, out, **parameters) -> 'ename: evalue'`` for a run that must fail."""
    return _failing_run


@pytest.fixture
def notebooks_dir() -> Path:
    """The repository's notebooks folder."""
    return NOTEBOOKS_DIR
