"""Command line: ``python -m experiments sweep ...`` and ``python -m experiments demo ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from diagnostics import run_status
from experiments.sweep import RESULTS_FILE, parse_value, run_sweep

DEMO_NOTEBOOK = "03_half_precision_stability.ipynb"


def _notebooks_dir() -> Path:
    """The repository's ``notebooks/`` folder (next to the package), else ``./notebooks``."""
    here = Path(__file__).resolve().parents[1] / "notebooks"
    return here if here.is_dir() else Path.cwd() / "notebooks"


def _grid(pairs: list[list[str]] | None) -> dict[str, list[Any]]:
    """Turn ``-p NAME V1 V2`` groups into a parameter grid, parsing each value."""
    grid: dict[str, list[Any]] = {}
    for group in pairs or []:
        name, *values = group
        if not values:
            raise SystemExit(f"error: -p {name} needs at least one value")
        if name in grid:
            raise SystemExit(
                f"error: parameter {name!r} given twice; list all its values in one -p"
            )
        try:
            grid[name] = [parse_value(v) for v in values]
        except ValueError as exc:
            raise SystemExit(f"error: -p {name}: {exc}") from None
    return grid


def _sweep(args: argparse.Namespace) -> int:
    """Run the sweep subcommand; exit code 1 when any combination failed."""
    grid = _grid(args.param)
    try:
        summary = run_sweep(
            args.notebook,
            grid,
            args.out,
            jobs=args.jobs,
            force=args.force,
            timeout=args.timeout,
            kernel_name=args.kernel,
        )
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = summary[summary["status"] != "ok"]
    print(f"{len(summary)} combinations, {len(failed)} failed")
    for _, row in failed.iterrows():
        print(f"  FAILED {row['run']}: {row['error']}")
    print(f"summary: {out / 'summary.csv'}")
    print(f"report:  {out / 'report.html'}")
    return 1 if len(failed) else 0


#: Columns of the demo summary: (results.json key, header, format).
_SUMMARY_COLUMNS = (
    ("test_accuracy", "test acc", "{:.3f}"),
    ("final_loss", "final loss", "{:.3g}"),
    ("nan_inf_events", "NaN/Inf", "{}"),
    ("optimizer_state_bytes", "state KiB", "{:.0f}"),
    ("ms_per_step", "ms/step", "{:.1f}"),
)


#: How the demo summary words each run status (`diagnostics.run_status`).
_STATUS_WORDS = {
    "ok": "finite",
    "stopped early": "finite",
    "diverged": "diverged",
    "failed": "gave up",
}


def _cell(value: Any, fmt: str, key: str) -> str:
    """One formatted table cell ('-' for missing or non-finite values)."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if key == "optimizer_state_bytes":
        value = value / 1024
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _print_summary(results: dict[str, Any]) -> None:
    """Print the demo's one-screen summary from the notebook's ``results.json``."""
    runs = results.get("runs", [])
    if not runs:
        print("(the notebook reported no runs)")
        return
    width = max(len(str(r.get("label", ""))) for r in runs) + 2
    print("run".ljust(width) + "".join(h.rjust(11) for _, h, _ in _SUMMARY_COLUMNS) + "  status")
    for r in runs:
        cells = "".join(_cell(r.get(k), f, k).rjust(11) for k, _, f in _SUMMARY_COLUMNS)
        status = run_status(error=r.get("error"), diverged=r.get("diverged"))
        print(str(r.get("label", "")).ljust(width) + cells + "  " + _STATUS_WORDS[status])
    for line in results.get("findings", []):
        print(textwrap.fill(line, width=100, initial_indent="- ", subsequent_indent="  "))


def _demo(args: argparse.Namespace) -> int:
    """Execute notebook 03 with its defaults into ``--out``; print paths and a summary."""
    from papermill.exceptions import PapermillExecutionError

    from experiments.sweep import execute_notebook

    notebook = Path(args.notebook) if args.notebook else _notebooks_dir() / DEMO_NOTEBOOK
    if not notebook.is_file():
        print(f"error: notebook {str(notebook)!r} not found", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = {name: vals[0] for name, vals in _grid(args.param).items()}
    params["out_dir"] = str(out)
    executed = out / notebook.name
    start = time.perf_counter()
    try:
        execute_notebook(  # without the stored ipywidgets state (tens of MB)
            str(notebook),
            str(executed),
            parameters=params,
            kernel_name=args.kernel,
            cwd=str(notebook.resolve().parent),
            progress_bar=True,
        )
    except PapermillExecutionError as exc:
        print(f"error: the notebook failed: {exc.ename}: {exc.evalue}", file=sys.stderr)
        print(f"executed notebook (with the error): {executed}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    results = json.loads((out / RESULTS_FILE).read_text()) if (out / RESULTS_FILE).exists() else {}
    print()
    print(f"demo finished in {seconds:.0f} s")
    _print_summary(results)
    print(f"executed notebook: {executed}")
    report = out / "report.html"
    if report.exists():
        print(f"HTML report:       {report}")
    recordings = [r["recording"] for r in results.get("runs", []) if r.get("recording")]
    if recordings:
        folder = (out / recordings[0]).parent
        print(f"recordings:        {folder}{os.sep} ({len(recordings)} files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m experiments``."""
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sw = sub.add_parser(
        "sweep",
        help="run a notebook under papermill for every parameter combination",
        description="Run NOTEBOOK for every combination of the -p values (papermill), keep "
        "each executed notebook and recording, and write DIR/summary.csv and DIR/report.html. "
        'Values are parsed: ints, floats, true/false, none, JSON lists (\'["singd","kfac"]\'). '
        "Combinations already done are skipped unless --force.",
    )
    sw.add_argument("notebook", help="the notebook to run (.ipynb)")
    sw.add_argument(
        "-p",
        "--param",
        nargs="+",
        action="append",
        metavar=("NAME", "VALUE"),
        help="a parameter and its values: -p NAME V1 V2 ... (repeatable)",
    )
    sw.add_argument("--out", required=True, help="output folder DIR")
    sw.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1)")
    sw.add_argument("--force", action="store_true", help="re-run combinations already done")
    sw.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    sw.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    sw.set_defaults(func=_sweep)

    de = sub.add_parser(
        "demo",
        help="run the half-precision stability notebook with its defaults",
        description="Execute notebooks/03_half_precision_stability.ipynb under papermill into "
        "--out; writes the executed notebook and the self-contained HTML report.",
    )
    de.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    de.add_argument("--notebook", default=None, help="another notebook to run instead")
    de.add_argument(
        "-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"), help="override"
    )
    de.add_argument("--kernel", default="python3", help="Jupyter kernel name (default python3)")
    de.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
