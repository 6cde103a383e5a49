"""`report`: one self-contained HTML file with every figure and a summary table for some runs.

The page comes from the one HTML writer (`diagnostics.views.page`): plotly.js inlined
exactly once, no network resources, controls that are plotly's own dropdowns, so the file
works offline and without a kernel; it is written atomically. Each run's row of the summary
table is its `RunSummary` (`diagnostics.views.summary`); each run's "Diagnosis" is what
`diagnostics.diagnose` found (the origin first, stalled parameters, the findings table
with the origin's row highlighted and rows beyond `SHOWN_FINDINGS` folded).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from diagnostics.diagnose import Diagnosis, diagnose
from diagnostics.record.recording import Recording
from diagnostics.views.figures import all_figures, as_recordings, human_bytes
from diagnostics.views.page import figure_html, heading, html_page, table_html, write_html
from diagnostics.views.summary import run_summary

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
#: Columns of the summary table on the page; the others sit in a folded table below it.
ESSENTIAL_COLUMNS = (
    "run",
    "status",
    "test_accuracy",
    "final_loss",
    "nan_inf_events",
    "optimizer_state_bytes",
    "time_per_step_s",
    "why",
)
#: Columns left out of the summary table: they repeat one of the columns above.
_REPEATS = ("nan_events", "time_per_step", "error")
#: Columns with free text: wrapped instead of widening the table.
_TEXT_COLUMNS = ("run", "why", "config", "versions")

#: Findings rows shown per run before the rest are folded under ``<details>``.
SHOWN_FINDINGS = 10

_TITLES = {
    "eig_min": "Smallest eigenvalue against −damping",
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
    df = pd.DataFrame([run_summary(r).table_row() for r in as_recordings(recordings)])
    first = [c for c in FIRST_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in first and c not in _REPEATS]
    return df[first + rest]


def _format_table(df: pd.DataFrame) -> str:
    """The summary table as escaped HTML with readable units: the `ESSENTIAL_COLUMNS`, then
    every other column in a second table folded under ``<details>``."""
    main = [c for c in ESSENTIAL_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in main]
    html_main = _table(df[main])
    if not rest:
        return html_main
    folded = _table(df[["run", *rest]])
    return (
        f'{html_main}<details class="more"><summary>All numbers ({len(rest)} more columns)'
        f"</summary>{folded}</details>"
    )


def _table(df: pd.DataFrame) -> str:
    """One escaped HTML table with readable units and headers."""
    shown = df.copy()
    for col in shown.columns:
        if col.endswith("_bytes"):
            shown[col] = [
                human_bytes(v) if isinstance(v, (int, float)) and math.isfinite(v) else "–"
                for v in shown[col]
            ]
    if "time_per_step_s" in shown:
        shown["time_per_step_s"] = [
            f"{1e3 * v:.3g} ms" if isinstance(v, float) and math.isfinite(v) else "–"
            for v in shown["time_per_step_s"]
        ]
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
    return table_html(shown, text_columns=_TEXT_COLUMNS)


def report_html(recordings: Any, *, title: str = "singd-lab report") -> str:
    """The report as one HTML string (see `report`)."""
    recs = as_recordings(recordings)
    figs = all_figures(recs)
    body = [
        f'<p class="note">{len(recs)} run(s): '
        + ", ".join(html.escape(r.name) for r in recs)
        + f". Written {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC.</p>",
        heading("Summary"),
        _format_table(summary_table(recs)),
    ]
    body.append(_diagnosis_section(recs))
    for i, (key, fig) in enumerate(figs.items()):
        body.append(heading(_TITLES.get(key, key)))
        body.append(figure_html(fig, f"fig-{key}-{i}"))
    body.append(_meta_section(recs))
    return html_page(title, body)


def _diagnosis_section(recs: list[Recording]) -> str:
    """Per run: diagnose's headline (where trouble started), stalled parameters, findings."""
    parts = [heading("Diagnosis")]
    for r in recs:
        parts.append(f'<h3 class="run">{html.escape(r.name)}</h3>')
        try:
            d = diagnose(r)
        except Exception as exc:  # a report is still written for a recording diagnose refuses
            parts.append(f'<p class="note">diagnose failed: {html.escape(repr(exc))}</p>')
            continue
        parts.append(f'<p class="headline">{html.escape(d.headline())}</p>')
        if d.stalled:
            names = ", ".join(html.escape(s) for s in d.stalled)
            parts.append(
                f"<p>Stalled (never moved while their gradients were non-zero): {names}</p>"
            )
        if len(d.findings):
            parts.append(findings_html(d))
    return "\n".join(parts)


def findings_html(d: Diagnosis, shown: int = SHOWN_FINDINGS) -> str:
    """The findings of ``d`` as escaped tables: the first ``shown`` rows (the origin's row
    highlighted), the rest folded under ``<details>``; each layer with its kind."""
    f = d.findings.copy()
    f.insert(2, "layer kind", [d.kinds.get(layer, "") for layer in f["layer"]])
    hit = (f["layer"] == d.origin) & (f["step"] == d.origin_step)
    origin = int(hit.to_numpy().argmax()) if d.origin is not None and hit.any() else -1
    text = ("layer", "layer kind", "evidence", "message")
    out = _highlight_row(table_html(f.head(shown), text_columns=text), origin)
    if len(f) > shown:
        rest = table_html(f.iloc[shown:], text_columns=text)
        out += (
            f'<details class="more"><summary>{len(f) - shown} more findings</summary>'
            f"{_highlight_row(rest, origin - shown)}</details>"
        )
    return out


def _highlight_row(table: str, row: int) -> str:
    """Give body row ``row`` of an HTML table ``class="origin"`` (nothing when out of range)."""
    if row < 0:
        return table
    head, sep, body = table.partition("<tbody>")
    pieces = body.split("<tr>")
    if not sep or row + 1 >= len(pieces):
        return table
    marked = [('<tr class="origin">' if i == row else "<tr>") + x for i, x in enumerate(pieces[1:])]
    return head + sep + pieces[0] + "".join(marked)


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
    table = table_html(
        pd.DataFrame(rows), text_columns=("config", "versions"), na_rep="NaN", float_format=None
    )
    return heading("Runs") + table


def report(recordings: Any, path: str | os.PathLike, *, title: str = "singd-lab report") -> Path:
    """Write one self-contained HTML report for one or several runs to ``path``.

    ``recordings``: a Recording, a Recorder, a path to a saved recording, or a list /
    dict of them. Returns the path written.
    """
    recs = as_recordings(_load_paths(recordings))
    return write_html(report_html(recs, title=title), path)


def _load_paths(source: Any) -> Any:
    """Replace file paths (str / Path) by the recordings they hold."""
    if isinstance(source, (str, os.PathLike)):
        return Recording.load(source)
    if isinstance(source, dict):
        return {k: _load_paths(v) for k, v in source.items()}
    if isinstance(source, (list, tuple)):
        return [_load_paths(v) for v in source]
    return source
