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
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

from diagnostics.figures import _human_bytes, all_figures, as_recordings
from diagnostics.recording import Recording

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
table.summary { border-collapse: collapse; font-size: 0.9em; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary thead th { background: #f0f0f0; }
.note { color: #666; font-size: 0.85em; }
"""

_TITLES = {
    "curves": "Loss and accuracy",
    "condition": "Condition numbers",
    "spectrum": "Spectra over steps",
    "events": "NaN/Inf events",
    "memory": "Memory breakdown",
}


def summary_table(recordings: Any) -> pd.DataFrame:
    """One row per run: final/min loss, summary numbers (e.g. test accuracy), NaN/Inf
    events, skipped steps, optimizer state bytes, peak memory and median time per step."""
    recs = as_recordings(recordings)
    return pd.DataFrame([r.summary_row() for r in recs])


def _format_table(df: pd.DataFrame) -> str:
    """The summary table as escaped HTML with readable units."""
    shown = df.copy()
    for col in ("optimizer_state_bytes", "peak_memory_bytes"):
        if col in shown:
            shown[col] = [
                _human_bytes(v) if isinstance(v, (int, float)) and math.isfinite(v) else "–"
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
        }
    )
    return shown.to_html(
        index=False,
        classes="summary",
        border=0,
        escape=True,
        na_rep="–",
        float_format="{:.4g}".format,
    )


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
        parts.append(
            pio.to_html(
                fig,
                include_plotlyjs=False,
                include_mathjax=False,
                full_html=False,
                div_id=f"fig-{key}-{i}",
                config={"displaylogo": False, "responsive": True},
            )
        )
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
    return f"<h2>Runs</h2>{table}"


def report(recordings: Any, path: str | os.PathLike, *, title: str = "singd-lab report") -> Path:
    """Write one self-contained HTML report for one or several runs to ``path``.

    ``recordings``: a Recording, a Recorder, a path to a saved recording, or a list /
    dict of them. Returns the path written.
    """
    recs = as_recordings(_load_paths(recordings))
    text = report_html(recs, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
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
