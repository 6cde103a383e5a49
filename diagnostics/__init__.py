"""Diagnostics for SINGD runs: recording, figures, dashboards and reports (see DESIGN.md §4)."""

from diagnostics.figures import (
    all_figures,
    condition_figure,
    curves_figure,
    events_figure,
    memory_figure,
    save_figure,
    spectrum_figure,
)
from diagnostics.recorder import Recorder
from diagnostics.recording import Recording
from diagnostics.report import report, summary_table
from diagnostics.training import TrainResult, train

__all__ = [
    "Dashboard",
    "Recorder",
    "Recording",
    "TrainResult",
    "all_figures",
    "condition_figure",
    "curves_figure",
    "dashboard",
    "events_figure",
    "memory_figure",
    "report",
    "save_figure",
    "spectrum_figure",
    "summary_table",
    "train",
]


def __getattr__(name: str):
    """Import the dashboard lazily: ipywidgets is an optional (notebooks) dependency."""
    if name in ("dashboard", "Dashboard"):
        from diagnostics import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'diagnostics' has no attribute {name!r}")
