"""Notebooks find their files from any working directory, not only from ``notebooks/``."""

from __future__ import annotations

import json
from pathlib import Path

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
