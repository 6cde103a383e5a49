"""The one HTML writer: self-contained pages of headings, tables and plotly figures.

plotly.js is inlined exactly once in the page head; no ``<script src=...>``, no fonts or
styles from the network, so a page works offline and without a kernel. Pages are written
atomically with ``diagnostics.record.recording.atomic_file``. The run report
(`diagnostics.views.report`) and the sweep report (``experiments.sweep``) both use it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from diagnostics.record.recording import atomic_file

CSS = """
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
table.summary tr.origin td { background: #fff3cd; font-weight: 600; }
h3.run { font-size: 1.05em; margin-bottom: 0.3em; } p.headline { font-weight: 600; }
details.more { margin-top: 0.6em; } details.more summary { cursor: pointer; color: #444; }
.note { color: #666; font-size: 0.85em; }
"""


def html_page(title: str, body: Iterable[str]) -> str:
    """A complete HTML document: escaped ``title``, the shared style, plotly.js inlined once
    in the head, then the ``body`` fragments (already HTML) in order."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        # plotly.js, inlined once; every figure of the page uses it
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *body,
        "</body></html>",
    ]
    return "\n".join(parts)


def heading(text: str) -> str:
    """An escaped ``<h2>`` section heading."""
    return f"<h2>{html.escape(text)}</h2>"


def figure_html(fig: go.Figure, div_id: str) -> str:
    """A plotly figure as a page fragment that fills the page width at the figure's height
    (using the page's plotly.js; the figure's layout is set to autosize)."""
    fig.update_layout(autosize=True, width=None)
    plot = pio.to_html(
        fig,
        include_plotlyjs=False,
        include_mathjax=False,
        full_html=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
        default_height=f"{fig.layout.height or 450}px",  # a definite height
    )
    return f'<div class="figure">\n{plot}\n</div>'


def table_html(
    df: pd.DataFrame,
    *,
    text_columns: Iterable[str] = (),
    na_rep: str = "–",
    float_format: Callable[[float], str] | None = "{:.4g}".format,
) -> str:
    """A DataFrame as an escaped HTML table in a horizontally scrolling box; cells of
    ``text_columns`` wrap instead of widening the table."""
    wanted = set(text_columns)
    positions = [i for i, c in enumerate(df.columns) if c in wanted]
    with pd.option_context("display.max_colwidth", None):  # never cut a cell's text
        table = df.to_html(
            index=False,
            classes="summary",
            border=0,
            escape=True,
            na_rep=na_rep,
            float_format=float_format,
        )
    return f'<div class="table-wrap">{_mark_text_cells(table, positions)}</div>'


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


def write_html(text: str, path: str | os.PathLike) -> Path:
    """Write an HTML document to ``path`` atomically (never a partial file); returns the path."""
    path = Path(path)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


__all__ = ["CSS", "figure_html", "heading", "html_page", "table_html", "write_html"]
