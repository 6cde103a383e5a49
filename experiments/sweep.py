"""Parameter sweeps over a notebook: every combination run under papermill, one summary.

Each combination runs in its own folder ``OUT/runs/<run_id>/`` holding the executed
notebook (``notebook.ipynb``), ``run.json`` (parameters, status, error, seconds) and
whatever the notebook writes there. A notebook that declares an ``out_dir`` parameter
gets that folder as ``out_dir``; it may write ``results.json`` into it::

    {"runs": [{"label": "singd-bfloat16", "final_loss": 0.31, ..., "recording": "rec.pt"}]}

(one entry per training run inside the notebook, scalar metrics plus an optional
recording path relative to ``out_dir``; an optional ``"claims"`` dict of scalars becomes
``claims.<name>`` columns of the summary). The sweep then writes ``OUT/summary.csv`` (one
row per combination), ``OUT/runs.csv`` (one row per combination and inner run) and
``OUT/report.html`` (self-contained: table and comparison figures, plotly.js inlined).
A failed combination is kept as a row with ``status == "failed"`` and its error; the
others still run. Re-running skips combinations already done unless ``force=True``.
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

from diagnostics import run_status
from diagnostics.record.recording import atomic_file

#: The file a notebook may write into its ``out_dir`` for the sweep to read.
RESULTS_FILE = "results.json"
#: The per-combination status file the sweep writes.
RUN_FILE = "run.json"
#: Name of the executed notebook inside each run folder.
NOTEBOOK_FILE = "notebook.ipynb"

_STATUS_COLUMNS = ["run", "status", "error", "seconds", "notebook"]

#: Options for ``papermill.execute_notebook`` (papermill passes them on to nbclient):
#: ``store_widget_state=False`` keeps the ipywidgets state (tens of MB for a live
#: dashboard, useless without a kernel) out of the executed notebook's metadata.
EXECUTE_OPTIONS: dict[str, Any] = {"store_widget_state": False}


def strip_widget_state(path: str | Path) -> int:
    """Remove stored ipywidgets state (``metadata.widgets``) from a notebook file in place.

    Returns the number of bytes saved (0 when there was none; the file is then untouched).
    The widget views in cell outputs stay; offline they show their text fallback.
    """
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if "widgets" not in nb.metadata:
        return 0
    before = path.stat().st_size
    del nb.metadata["widgets"]
    nbformat.write(nb, path)
    return before - path.stat().st_size


def execute_notebook(notebook: str | Path, output: str | Path, **kwargs: Any) -> Any:
    """``papermill.execute_notebook`` without stored widget state (see `EXECUTE_OPTIONS`).

    The state is also stripped from the written notebook afterwards, including when the
    notebook failed (papermill then still writes it, with the error).
    """
    import papermill

    try:
        return papermill.execute_notebook(str(notebook), str(output), **EXECUTE_OPTIONS, **kwargs)
    finally:
        if Path(output).is_file():
            strip_widget_state(output)


def parse_value(text: str) -> Any:
    """Parse one command-line value: int, float, bool, None, JSON list/dict, else the string."""
    if not isinstance(text, str):
        raise TypeError(f"value must be a str, got {type(text).__name__}")
    stripped = text.strip()
    low = stripped.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", stripped):
        return int(stripped)
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", low):
        return float(stripped)
    if stripped[:1] in ("[", "{", '"'):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"value {text!r} looks like JSON but does not parse: {exc}") from None
    return text


def combinations(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of a parameter grid, in the order the names and values were given."""
    if not isinstance(grid, Mapping):
        raise TypeError(f"grid must map parameter names to lists of values, got {type(grid)}")
    for name, values in grid.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"parameter name {name!r} is not a Python identifier")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"parameter {name!r} needs a non-empty list of values, got {values!r}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def run_id(params: Mapping[str, Any]) -> str:
    """A readable, file-system safe, unique folder name for one combination."""
    encoded = json.dumps(params, sort_keys=True, default=str)
    digest = hashlib.sha1(encoded.encode()).hexdigest()[:8]
    parts = []
    for name, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        parts.append(f"{name}-{re.sub(r'[^A-Za-z0-9.+-]+', '_', text).strip('_')}")
    slug = "__".join(parts)[:80] or "default"
    return f"{slug}__{digest}"


def notebook_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares in its cell tagged ``parameters`` (via papermill)."""
    import papermill

    return dict(papermill.inspect_notebook(str(notebook)))


def _execute(
    notebook: str,
    run_dir: str,
    params: dict[str, Any],
    pass_out_dir: bool,
    kernel_name: str,
    timeout: float | None,
) -> dict[str, Any]:
    """Execute one combination under papermill and write its ``run.json`` (never raises)."""
    from papermill.exceptions import PapermillExecutionError

    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULTS_FILE).unlink(missing_ok=True)
    injected = dict(params)
    if pass_out_dir:
        injected["out_dir"] = str(folder)
    record: dict[str, Any] = {"run": folder.name, "params": params, "status": "ok", "error": ""}
    start = time.perf_counter()
    try:
        execute_notebook(
            notebook,
            str(folder / NOTEBOOK_FILE),
            parameters=injected,
            kernel_name=kernel_name,
            cwd=str(Path(notebook).resolve().parent),
            progress_bar=False,
            execution_timeout=timeout,
        )
    except PapermillExecutionError as exc:
        record["error"] = f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # a kernel death or timeout must not stop the sweep
        record["error"] = f"{type(exc).__name__}: {exc}".strip()
    record["status"] = run_status(error=record["error"])  # "ok" or "failed"
    record["seconds"] = round(time.perf_counter() - start, 3)
    with atomic_file(folder / RUN_FILE, "w") as f:  # a crash never leaves half a run.json
        f.write(json.dumps(record, indent=1, default=str))
    return record


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _inner_runs(run_dir: Path) -> list[dict[str, Any]]:
    """The inner runs a notebook reported in ``results.json`` (recording paths resolved)."""
    results = _read_json(run_dir / RESULTS_FILE) or {}
    rows = []
    for i, entry in enumerate(results.get("runs", [])):
        if not isinstance(entry, dict):
            continue
        row = {"label": str(entry.get("label", i))}
        for key, value in entry.items():
            if key == "label":
                continue
            if key == "recording" and value:
                row["recording"] = str((run_dir / str(value)).resolve())
            elif value is None or isinstance(value, (bool, int, float, str)):
                row[key] = value
        rows.append(row)
    return rows


def _tables(out: Path, records: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the per-combination summary and the long per-inner-run table."""
    summary_rows, long_rows = [], []
    for rec in records:
        run_dir = out / "runs" / rec["run"]
        base = {"run": rec["run"], **rec["params"]}
        row = {
            **base,
            "status": rec["status"],
            "error": rec.get("error", ""),
            "seconds": rec.get("seconds", math.nan),
            "notebook": str(run_dir / NOTEBOOK_FILE),
        }
        inner = _inner_runs(run_dir) if rec["status"] == "ok" else []
        row["n_runs"] = len(inner)
        for entry in inner:
            long_rows.append({**base, **entry})
            for key, value in entry.items():
                if key == "label":
                    continue
                column = key if len(inner) == 1 else f"{entry['label']}.{key}"
                row[column] = value
        if rec["status"] == "ok":
            claims = (_read_json(run_dir / RESULTS_FILE) or {}).get("claims", {})
            for key, value in claims.items() if isinstance(claims, dict) else ():
                if value is None or isinstance(value, (bool, int, float, str)):
                    row.setdefault(f"claims.{key}", value)
        summary_rows.append(row)
    summary = pd.DataFrame(summary_rows)
    long = pd.DataFrame(long_rows)
    return summary, long


def _json_cell(value: Any) -> str:
    """How a parameter value is written in a CSV cell (lists as JSON)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _run_names(summary: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """Short names of the inner runs: the parameters that vary, then the run's label."""
    params = [c for c in parameter_columns(summary) if c in runs.columns] if len(summary) else []
    varying = [c for c in params if summary[c].map(_json_cell).astype(str).nunique() > 1]
    return [
        " ".join(f"{n}={_json_cell(r[n])}" for n in varying) + f" | {r['label']}"
        for _, r in runs.iterrows()
    ]


def _metric_figure(runs: pd.DataFrame, names: list[str], metrics: list[str]):
    """A bar chart of one metric per inner run, with a dropdown choosing the metric."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, metric in enumerate(metrics):
        fig.add_bar(x=names, y=runs[metric], name=metric, visible=i == 0)
    buttons = [
        {
            "label": metric,
            "method": "update",
            "args": [
                {"visible": [j == i for j in range(len(metrics))]},
                {"yaxis": {"title": {"text": metric}}},
            ],
        }
        for i, metric in enumerate(metrics)
    ]
    fig.update_layout(
        title="metrics per run (choose the metric)",
        updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15, "xanchor": "right"}],
        yaxis_title=metrics[0],
        height=500,
        margin={"b": 200},
    )
    return fig


def write_report(summary: pd.DataFrame, runs: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Write a self-contained HTML report: summary table, metric and recording figures."""
    from diagnostics.views.page import figure_html, heading, html_page, table_html, write_html

    path = Path(path)
    n_failed = int((summary["status"] != "ok").sum()) if len(summary) else 0
    shown = summary.drop(columns=["notebook"], errors="ignore").map(_json_cell)
    body = [
        f"<p>{len(summary)} combinations, {n_failed} failed.</p>",
        table_html(shown, text_columns=("error",), na_rep=""),
    ]
    for i, (title_, fig) in enumerate(_report_figures(summary, runs)):
        body += [heading(title_), figure_html(fig, f"fig-{i}")]
    links = []
    for _, row in summary.iterrows():
        run_html = Path(row["notebook"]).parent / "report.html"
        if run_html.exists():
            rel = run_html.resolve().relative_to(path.parent.resolve())
            links.append(
                f"<li><a href='{html.escape(str(rel))}'>{html.escape(row['run'])}</a></li>"
            )
    if links:
        body.append(heading("Reports of the single runs") + "<ul>" + "".join(links) + "</ul>")
    return write_html(html_page(title, body), path)


def _report_figures(summary: pd.DataFrame, runs: pd.DataFrame) -> list[tuple[str, Any]]:
    """(heading, figure) pairs of the sweep report: a metric per inner run, then the loss
    curves, NaN/Inf events and memory of the recordings the runs kept."""
    from diagnostics import Recording, curves_figure, events_figure, memory_figure

    figures: list[tuple[str, Any]] = []
    if not len(runs):
        return figures
    names = _run_names(summary, runs)
    skip = set(summary.columns) | {"label", "recording"}
    metrics = [c for c in runs.columns if c not in skip and pd.api.types.is_numeric_dtype(runs[c])]
    if metrics:
        figures.append(("Metrics per run", _metric_figure(runs, names, metrics)))
    recordings = {}
    for name, file in zip(names, runs.get("recording", pd.Series([None] * len(runs)))):
        if isinstance(file, str) and Path(file).is_file():
            try:
                recordings[name] = Recording.load(file)
            except ValueError:
                continue  # a damaged recording is left out of the figures, not fatal
    if recordings:
        figures.append(("Training curves", curves_figure(recordings, log_loss=True)))
        figures.append(("NaN/Inf events", events_figure(recordings)))
        figures.append(("Optimizer memory", memory_figure(recordings)))
    return figures


def parameter_columns(summary: pd.DataFrame) -> list[str]:
    """The swept parameter columns of a summary table (those between ``run`` and ``status``)."""
    cols = list(summary.columns)
    if "run" not in cols or "status" not in cols:
        raise ValueError("summary must be a sweep summary with 'run' and 'status' columns")
    return cols[cols.index("run") + 1 : cols.index("status")]


def load_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a sweep folder back: (summary per combination, table per inner run)."""
    out = Path(sweep_dir)
    if not (out / "runs").is_dir():
        raise FileNotFoundError(f"sweep_dir {str(out)!r} holds no 'runs' folder; run a sweep first")
    records = []
    for run_file in sorted((out / "runs").glob(f"*/{RUN_FILE}")):
        rec = _read_json(run_file)
        if rec is not None and "params" in rec:
            records.append(rec)
    return _tables(out.resolve(), records)


def run_sweep(
    notebook: str | Path,
    grid: Mapping[str, Sequence[Any]],
    out: str | Path,
    *,
    jobs: int = 1,
    force: bool = False,
    timeout: float | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Run ``notebook`` for every combination of ``grid`` under papermill; return the summary."""
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook {str(notebook)!r} does not exist")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive seconds or None, got {timeout!r}")
    combos = combinations(grid) if grid else [{}]
    declared = notebook_parameters(notebook)
    unknown = sorted(set(grid) - set(declared))
    if unknown:
        raise ValueError(
            f"parameter(s) {unknown} not declared by {notebook.name}; "
            f"its parameters are {sorted(declared)}"
        )
    if "out_dir" in grid:
        raise ValueError("parameter 'out_dir' is set by the sweep (one folder per run)")
    out = Path(out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for params in combos:
        rid = run_id(params)
        previous = _read_json(out / "runs" / rid / RUN_FILE)
        if not force and previous and previous.get("status") == "ok":
            records[rid] = previous
        else:
            todo.append((rid, params))

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(combos),
        initial=len(records),
        desc=f"sweep {notebook.name}",
        unit="run",
        disable=not progress,
        file=sys.stderr,
    )
    failed = 0

    def finish(record: dict[str, Any]) -> None:
        nonlocal failed
        records[record["run"]] = record
        failed += record["status"] != "ok"
        bar.set_postfix(failed=failed)
        bar.update(1)
        if on_result is not None:
            on_result(record)

    args = [
        (str(notebook.resolve()), str(out / "runs" / rid), p, "out_dir" in declared, kernel_name)
        for rid, p in todo
    ]
    try:
        if jobs == 1 or len(args) <= 1:
            for a in args:
                finish(_execute(*a, timeout))
        else:
            # threads suffice: each notebook runs in its own kernel process
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures: list[Future] = [pool.submit(_execute, *a, timeout) for a in args]
                for fut in as_completed(futures):
                    finish(fut.result())
    finally:
        bar.close()

    ordered = [records[run_id(p)] for p in combos if run_id(p) in records]
    summary, long = _tables(out, ordered)
    summary.map(_json_cell).to_csv(out / "summary.csv", index=False)
    long.map(_json_cell).to_csv(out / "runs.csv", index=False)
    write_report(summary, long, out / "report.html", title=f"Sweep of {notebook.name}")
    return summary


__all__ = [
    "RESULTS_FILE",
    "combinations",
    "load_sweep",
    "notebook_parameters",
    "parameter_columns",
    "parse_value",
    "run_id",
    "run_sweep",
    "write_report",
]
