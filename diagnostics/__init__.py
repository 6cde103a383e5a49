"""Diagnostics for SINGD runs: recording, figures, dashboards and reports (see DESIGN.md §4)."""

from diagnostics.recorder import Recorder
from diagnostics.recording import Recording

__all__ = ["Recorder", "Recording"]
