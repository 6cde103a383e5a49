"""Diagnostics for training runs: recording (``diagnostics.record``), views (``diagnostics.views``).

See docs/architecture.md for the rooms and what each may import.
"""

from diagnostics.diagnose import Diagnosis, diagnose
from diagnostics.record.recorder import Recorder
from diagnostics.record.recording import Recording
from diagnostics.views.figures import (
    all_figures,
    condition_figure,
    curves_figure,
    eig_min_figure,
    events_figure,
    memory_figure,
    save_figure,
    spectrum_figure,
)
from diagnostics.views.report import report, summary_table
from diagnostics.views.summary import RunSummary, run_status, run_summary

__all__ = [
    "Dashboard",
    "Diagnosis",
    "Recorder",
    "Recording",
    "RunSummary",
    "all_figures",
    "condition_figure",
    "curves_figure",
    "dashboard",
    "diagnose",
    "eig_min_figure",
    "events_figure",
    "memory_figure",
    "report",
    "run_status",
    "run_summary",
    "save_figure",
    "spectrum_figure",
    "summary_table",
]


def __getattr__(name: str):
    """Import the dashboard lazily: ipywidgets is an optional (notebooks) dependency."""
    if name in ("dashboard", "Dashboard"):
        from diagnostics.views import dashboard as widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
