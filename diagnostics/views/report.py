"""`report`: one self-contained HTML file with every figure and a summary table for some runs.

plotly.js is inlined exactly once; no ``<script src=...>``, no fonts or styles from the
network; the controls are plotly's own dropdowns, so the file works offline and without a
kernel. The file is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from diagnostics.record.recording import Recording, atomic_file
from diagnostics.views.figures import _human_bytes, all_figures, as_recordings

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em;
       color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
.figure { width: 100%; }
.figure .plotly-graph-div { width: 100% !important; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table.summary { border-collapse: collapse; font-size: 0.85em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 3px 6px; text-align: right;
       vertical-align: top; }
table.summary th { white-space: normal; max-width: 9em; }
table.summary td { white-space: nowrap; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary td.text { white-space: normal; text-align: left; min-width: 12em;
       max-width: 32em; overflow-wrap: anywhere; }
table.summary thead th { background: #f0f0f0; }
.note { color: #666; font-size: 0.85em; }
"""

#: Columns shown first in the summary table, in this order (the rest follow).
FIRST_COLUMNS = (
    "run",
    "test_accuracy",
    "final_loss",
    "nan_inf_events",
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "time_per_step_s",
    "status",
    "why",
)
#: Columns left out of the summary table: they repeat one of the columns above.
_REPEATS = ("nan_events", "time_per_step", "error")
#: Columns with free text: wrapped instead of widening the table.
_TEXT_COLUMNS = ("why", "config", "versions")

_TITLES = {
    "curves": "Loss and accuracy",
    "condition": "Condition numbers",
    "spectrum": "Spectra over steps",
    "events": "NaN/Inf events",
    "memory": "Memory breakdown",
}


def summary_table(recordings: Any) -> pd.DataFrame:
    """One row per run: test accuracy, final/min loss, NaN/Inf events, optimizer state bytes,
    peak memory, median time per step, status and why (the error of a run that gave up),
    then the other summary numbers; the most useful columns first (`FIRST_COLUMNS`)."""
    recs = as_recordings(recordings)
    rows = []
    for r in recs:
        row = r.summary_row()
        summ = r.summary
        why = summ.get("why") or summ.get("error") or ""
        if isinstance(summ.get("status"), str):
            status = summ["status"]
        elif summ.get("error"):
            status = "failed"
        elif summ.get("diverged"):
            status = "diverged"
        elif summ.get("stopped_early"):
            status = "stopped early"
        else:
            status = "ok"
        row["status"], row["why"] = status, str(why)
        rows.append(row)
    df = pd.DataFrame(rows)
    first = [c for c in FIRST_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in first and c not in _REPEATS]
    return df[first + rest]


def _format_table(df: pd.DataFrame) -> str:
    """The summary table as escaped HTML with readable units, in a scrolling container."""
    shown = df.copy()
    for col in shown.columns:
        if col.endswith("_bytes"):
            shown[col] = [
                _human_bytes(v) if isinstance(v, (int, float)) and math.isfinite(v) else "–"
                for v in shown[col]
            ]
    if "time_per_step_s" in shown:
        shown["time_per_step_s"] = [
            f"{1e3 * v:.3g} ms" if isinstance(v, float) and math.isfinite(v) else "–"
            for v in shown["time_per_step_s"]
        ]
    text_cols = [i for i, c in enumerate(shown.columns) if c in _TEXT_COLUMNS]
    shown = shown.rename(
        columns={
            "time_per_step_s": "time / step (median)",
            "optimizer_state_bytes": "optimizer state",
            "peak_memory_bytes": "peak memory",
            "nan_inf_events": "NaN/Inf events",
            "test_accuracy": "test acc",
            "final_loss": "final loss",
        }
    )
    table = shown.to_html(
        index=False,
        classes="summary",
        border=0,
        escape=True,
        na_rep="–",
        float_format="{:.4g}".format,
    )
    return f'<div class="table-wrap">{_mark_text_cells(table, text_cols)}</div>'


def _mark_text_cells(table: str, columns: list[int]) -> str:
    """Give the ``<td>`` cells of the given column positions ``class="text"`` (they wrap)."""
    if not columns:
        return table
    out = []
    for line in table.split("<tr>"):
        cells = line.split("<td>")
        line = cells[0] + "".join(
            ('<td class="text">' if i - 1 in columns else "<td>") + c
            for i, c in enumerate(cells)
            if i > 0
        )
        out.append(line)
    return "<tr>".join(out)


def report_html(recordings: Any, *, title: str = "singd-lab report") -> str:
    """The report as one HTML string (see `report`)."""
    recs = as_recordings(recordings)
    figs = all_figures(recs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        # plotly.js, inlined once; every figure below uses it
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(recs)} run(s): '
        + ", ".join(html.escape(r.name) for r in recs)
        + f". Written {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC.</p>",
        "<h2>Summary</h2>",
        _format_table(summary_table(recs)),
    ]
    for i, (key, fig) in enumerate(figs.items()):
        parts.append(f"<h2>{html.escape(_TITLES.get(key, key))}</h2>")
        fig.update_layout(autosize=True, width=None)
        parts.append('<div class="figure">')
        parts.append(
            pio.to_html(
                fig,
                include_plotlyjs=False,
                include_mathjax=False,
                full_html=False,
                div_id=f"fig-{key}-{i}",
                config={"displaylogo": False, "responsive": True},
                default_width="100%",
                default_height=f"{fig.layout.height or 450}px",  # a definite height
            )
        )
        parts.append("</div>")
    parts.append(_meta_section(recs))
    parts.append("</body></html>")
    return "\n".join(parts)


def _meta_section(recs: list[Recording]) -> str:
    """Run metadata (config, seed, versions, optimizer) as a small escaped table."""
    rows = []
    for r in recs:
        m = r.meta
        rows.append(
            {
                "run": r.name,
                "optimizer": m.get("optimizer", ""),
                "seed": m.get("seed", ""),
                "config": str(m.get("config", "")),
                "versions": ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()),
            }
        )
    table = pd.DataFrame(rows).to_html(index=False, classes="summary", border=0, escape=True)
    return f'<h2>Runs</h2><div class="table-wrap">{_mark_text_cells(table, [3, 4])}</div>'


def report(recordings: Any, path: str | os.PathLike, *, title: str = "singd-lab report") -> Path:
    """Write one self-contained HTML report for one or several runs to ``path``.

    ``recordings``: a Recording, a Recorder, a path to a saved recording, or a list /
    dict of them. Returns the path written.
    """
    recs = as_recordings(_load_paths(recordings))
    text = report_html(recs, title=title)
    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _load_paths(source: Any) -> Any:
    """Replace file paths (str / Path) by the recordings they hold."""
    if isinstance(source, (str, os.PathLike)):
        return Recording.load(source)
    if isinstance(source, dict):
        return {k: _load_paths(v) for k, v in source.items()}
    if isinstance(source, (list, tuple)):
        return [_load_paths(v) for v in source]
    return source
