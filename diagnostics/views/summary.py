"""`RunSummary`: a run's status and key numbers, computed in one place for every table of runs.

The report's summary table, ``Recording.summary_row``, the sweep, the command line and
``experiments.TrainResult`` all take a run's status from `run_status` and its numbers from
`run_summary`, so a run is called "failed" or "diverged" by one rule everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diagnostics.record.recording import COLUMNS, Recording

#: The statuses of a run: it finished; it ended early without a NaN/Inf or an error; a
#: NaN/Inf appeared; the optimizer (or a notebook run) raised an error and gave up.
STATUSES = ("ok", "stopped early", "diverged", "failed")

#: The scalar types a summary row carries over from ``Recording.summary``.
_SCALARS = (int, float, str, bool)


def run_status(
    *, error: Any = None, diverged: Any = False, stopped_early: Any = False, status: Any = None
) -> str:
    """The status of a run (one of `STATUSES`): an explicit ``status`` string wins, then an
    error makes it "failed", then divergence "diverged", then stopping early "stopped early"."""
    if isinstance(status, str):
        return status
    if error:
        return "failed"
    if diverged:
        return "diverged"
    if stopped_early:
        return "stopped early"
    return "ok"


@dataclass(frozen=True)
class RunSummary:
    """A run's status, the reason for it, and the numbers every table of runs shows.

    ``time_per_step_s`` is the median recorded step time; ``nan_inf_events`` counts
    NaN/Inf events only (an error that ended the run is its status, not an event);
    ``extra`` holds the last logged accuracy-like values (``final_<name>``) and the scalar
    numbers training code put into ``Recording.summary`` (test accuracy, settings, ...).
    """

    run: str
    steps: int
    final_loss: float
    min_loss: float
    nan_inf_events: int
    skipped_steps: int
    optimizer_state_bytes: int
    peak_memory_bytes: int | None
    time_per_step_s: float
    status: str = "ok"
    why: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The numbers as one flat table row (``Recording.summary_row``), status not included
        unless training code put one into the recording's summary."""
        row: dict[str, Any] = {
            "run": self.run,
            "steps": self.steps,
            "final_loss": self.final_loss,
            "min_loss": self.min_loss,
            "nan_inf_events": self.nan_inf_events,
            "skipped_steps": self.skipped_steps,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "time_per_step_s": self.time_per_step_s,
        }
        for key, value in self.extra.items():
            row.setdefault(key, value)
        return row

    def table_row(self) -> dict[str, Any]:
        """`row` with ``status`` and ``why`` set: one row of the report's summary table."""
        row = self.row()
        row["status"], row["why"] = self.status, self.why
        return row


def run_summary(recording: Recording) -> RunSummary:
    """Summarise one recording: loss, NaN/Inf events, memory, step time, status and why.

    Numbers computed from the recording's frames come first; the scalars training code put
    into ``recording.summary`` (``error``, ``diverged``, ``stopped_early``, ``status``,
    ``why``, accuracies) fill in the rest and decide the status.
    """
    if not isinstance(recording, Recording):
        raise TypeError(f"recording must be a Recording, got {type(recording).__name__}")
    st = recording.steps
    losses = st["loss"].dropna()
    times = st["step_time_s"].dropna()
    sb = recording.state_bytes()
    events = recording.events
    summ = recording.summary
    return RunSummary(
        run=recording.name,
        steps=int(len(st)),
        final_loss=float(losses.iloc[-1]) if len(losses) else math.nan,
        min_loss=float(losses.min()) if len(losses) else math.nan,
        nan_inf_events=int((events["message"] == "").sum())
        if "message" in events
        else int(len(events)),
        skipped_steps=int(st["skipped"].sum()),
        optimizer_state_bytes=int(sb["bytes"].sum()) if len(sb) else 0,
        peak_memory_bytes=recording.peak_memory_bytes(),
        time_per_step_s=float(times.median()) if len(times) else math.nan,
        status=run_status(
            error=summ.get("error"),
            diverged=summ.get("diverged"),
            stopped_early=summ.get("stopped_early"),
            status=summ.get("status"),
        ),
        why=str(summ.get("why") or summ.get("error") or ""),
        extra=_extra(recording),
    )


def _extra(recording: Recording) -> dict[str, Any]:
    """The last value of each logged accuracy-like column, then the summary's scalars."""
    st = recording.steps
    extra: dict[str, Any] = {}
    for col in st.columns:
        if col not in COLUMNS["steps"] and "acc" in col.lower():
            vals = st[col].dropna()
            extra[f"final_{col}"] = float(vals.iloc[-1]) if len(vals) else math.nan
    for key, value in recording.summary.items():
        if isinstance(value, _SCALARS) or value is None:
            extra.setdefault(key, value)
    return extra


__all__ = ["STATUSES", "RunSummary", "run_status", "run_summary"]
