"""Run notebooks' code, with their asserted claims, in one plain Python process (no Jupyter).

Used by ``test_notebook_claims.py`` to re-check the claims cheaply under other kernel settings
(the environment of this process: ``MKL_CBWR``, ``MKL_ENABLE_INSTRUCTIONS``,
``ATEN_CPU_CAPABILITY`` are read when torch loads), seeds and perturbed inputs. Every code cell
runs in order after papermill's parameter injection, as in a kernel; figures are not shown and
``display`` prints nothing. A failing ``assert`` in a notebook ends the process with its message.

    python tests/notebooks/notebook_claims.py JOBS_JSON

``JOBS_JSON`` is a list of ``{"notebook": name, "out_dir": folder, "parameters": {...}}``; each
job writes its results.json (the notebook's asserted numbers) into its ``out_dir``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def run_notebook_code(name: str, out_dir: str, parameters: dict) -> None:
    """Execute ``notebooks/<name>``'s code cells with ``parameters`` (and ``out_dir``)."""
    import nbformat
    from papermill.parameterize import parameterize_notebook

    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    nb.metadata.setdefault("papermill", {})  # what papermill's own run adds first
    nb = parameterize_notebook(nb, {**parameters, "out_dir": str(out_dir)})
    namespace = {"__name__": "__main__", "display": lambda *args, **kwargs: None}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            exec(compile(cell.source, f"{name}, cell {index}", "exec"), namespace)


def main(argv: list[str]) -> int:
    import plotly.basedatatypes

    plotly.basedatatypes.BaseFigure.show = lambda self, *args, **kwargs: None  # nothing to show
    jobs = json.loads(argv[0])
    os.chdir(NOTEBOOKS_DIR)  # where papermill runs them (relative paths in parameters)
    for job in jobs:
        run_notebook_code(job["notebook"], job["out_dir"], job.get("parameters", {}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
