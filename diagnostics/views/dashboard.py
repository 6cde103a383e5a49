"""`dashboard`: an ipywidgets dashboard over recordings, optionally live while training runs.

Dropdowns pick the run, layer and factor (preconditioning factors only; it opens on the first
factor that failed, else the worst conditioned one), a slider picks the step (a typed step snaps
to the nearest recorded one); ``go.FigureWidget``s
(plotly >= 6 needs ``anywidget``) show the spectrum at that step, the condition number
over steps, the training curves, NaN/Inf events and the memory breakdown. With
``live=True`` the dashboard listens to a `Recorder` and redraws after every recorded step,
so it updates while the training loop runs in the same notebook.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from diagnostics.record.recorder import Recorder
from diagnostics.record.recording import Recording
from diagnostics.views.figures import PALETTE, as_recordings, events_figure, memory_figure
from diagnostics.views.style import (
    LOG_AXIS,
    damped_condition,
    first_failure,
    layer_labels,
    log_range_decades,
    preconditioning_factors,
    worst_conditioned,
)

_NONE = "(none)"
#: Width of each figure in pixels: two of them side by side (1230 px with gaps) fit the
#: output area of a 1400 px wide JupyterLab; narrower, the grid puts one per row.
FIGURE_WIDTH = 610


def _finite(values: list[float]) -> list[float | None]:
    return [v if v is not None and math.isfinite(v) else None for v in values]


class Dashboard(widgets.VBox):
    """The dashboard widget (a ``VBox``); see `dashboard`."""

    def __init__(self, source: Any, live: bool = False, min_interval: float = 1.0) -> None:
        items = list(source.items()) if isinstance(source, dict) else None
        seq = source if isinstance(source, (list, tuple)) else [source]
        if items is not None:
            seq = [v for _, v in items]
        for s in seq:
            if not isinstance(s, (Recording, Recorder)):
                raise TypeError(
                    "dashboard needs a Recording or Recorder (or a list/dict of them), "
                    f"got {type(s).__name__}"
                )
        self._sources = list(seq)
        self._names = [k for k, _ in items] if items is not None else None
        self._recorders = [s for s in seq if isinstance(s, Recorder)]
        if live and not self._recorders:
            raise ValueError("live=True needs a Recorder (a Recording does not change)")
        self.live = live
        if not isinstance(min_interval, (int, float)) or min_interval < 0:
            raise ValueError(f"min_interval must be a number of seconds >= 0, got {min_interval!r}")
        self.min_interval = float(min_interval)
        self._last_refresh = -math.inf
        self._recs: list[Recording] = []

        self.run = widgets.Dropdown(description="run")
        self.layer = widgets.Dropdown(description="layer")
        self.factor = widgets.Dropdown(description="factor")
        self.steps: list[int] = [0]
        self.step_slider = widgets.IntSlider(
            description="step",
            value=0,
            min=0,
            max=0,
            continuous_update=False,
            layout=widgets.Layout(width="100%", max_width=f"{2 * FIGURE_WIDTH}px"),
        )
        self.status = widgets.HTML()
        self.spectrum = go.FigureWidget(
            layout={"title": {"text": "Spectrum at step"}, "yaxis": LOG_AXIS,
                    "xaxis": {"title": {"text": "eigenvalue rank (0 = largest)"}},
                    "height": 330, "margin": {"t": 50}},
        )  # fmt: skip
        self.spectrum.add_scatter(mode="lines+markers", name="eigenvalues")
        self.condition = go.FigureWidget(
            layout={"title": {"text": "Condition number"}, "yaxis": LOG_AXIS,
                    "xaxis": {"title": {"text": "step"}}, "height": 330,
                    "margin": {"t": 50}},
        )  # fmt: skip
        self.condition.add_scatter(mode="lines+markers", name="cond")
        self.curves = go.FigureWidget(
            layout={"title": {"text": "Loss"}, "xaxis": {"title": {"text": "step"}},
                    "height": 330, "margin": {"t": 50}},
        )  # fmt: skip
        self.events = go.FigureWidget()
        self.memory = go.FigureWidget()

        self._busy = False
        self._steps_filled = False
        self.run.observe(self._on_run, names="value")
        self.layer.observe(self._on_layer, names="value")
        self.factor.observe(self._on_selection, names="value")
        self.step_slider.observe(self._on_step, names="value")
        controls = widgets.HBox(
            [self.run, self.layer, self.factor], layout=widgets.Layout(flex_flow="row wrap")
        )
        for fig in (self.spectrum, self.condition, self.curves, self.events, self.memory):
            fig.layout.width = FIGURE_WIDTH
            fig.layout.autosize = False
        # two figures per row where FIGURE_WIDTH fits twice, one per row otherwise
        self.figures = widgets.GridBox(
            [self.spectrum, self.condition, self.curves, self.events, self.memory],
            layout=widgets.Layout(
                grid_template_columns=f"repeat(auto-fill, minmax({FIGURE_WIDTH + 10}px, 1fr))",
                grid_gap="4px",
                width="100%",
            ),
        )
        super().__init__(
            [controls, self.step_slider, self.status, self.figures],
            layout=widgets.Layout(width="100%", max_width="100%", overflow="hidden"),
        )
        self._open_on_interesting()
        self.refresh()
        if live:
            for r in self._recorders:
                r.add_listener(self._on_recorded)

    # ------------------------------------------------------------------ data
    def _recordings(self) -> list[Recording]:
        srcs = self._sources
        if self._names is not None:
            return as_recordings(dict(zip(self._names, srcs)))
        return as_recordings(list(srcs))

    def _current(self) -> Recording | None:
        for r in self._recs:
            if r.name == self.run.value:
                return r
        return None

    def refresh(self) -> None:
        """Re-read the recordings (recorders give their latest data) and redraw everything."""
        self._last_refresh = time.monotonic()
        self._recs = self._recordings()
        self._busy = True
        try:
            names = [r.name for r in self._recs]
            keep = self.run.value if self.run.value in names else names[0]
            self.run.options = names
            self.run.value = keep
            self._fill_layers()
        finally:
            self._busy = False
        self._draw_all()

    def close_live(self) -> None:
        """Stop listening to the recorders (the dashboard keeps its last state)."""
        for r in self._recorders:
            r.remove_listener(self._on_recorded)

    def _fill_layers(self) -> None:
        rec = self._current()
        layers = _factor_layers(rec) if rec is not None else []
        labels = layer_labels(rec) if rec is not None else {}
        opts = [(labels.get(ly, ly), ly) for ly in layers] or [(_NONE, _NONE)]
        values = [v for _, v in opts]
        keep = self.layer.value if self.layer.value in values else values[0]
        self.layer.options = opts
        self.layer.value = keep
        self._fill_factors()

    def _fill_factors(self) -> None:
        rec = self._current()
        opts = [_NONE]
        if rec is not None and self.layer.value != _NONE:
            pairs = preconditioning_factors(rec)
            opts = [fa for ly, fa in pairs if ly == self.layer.value] or [_NONE]
        keep = self.factor.value if self.factor.value in opts else opts[0]
        self.factor.options = opts
        self.factor.value = keep
        self._fill_steps()

    def _fill_steps(self) -> None:
        """The slider spans the recorded steps (its stride their common spacing); it starts at
        the last one and, while it stays at the last one, follows new steps (a step picked by
        hand is kept if still there)."""
        rec = self._current()
        steps = [0]
        if rec is not None and len(rec.steps):
            rs = rec.steps[rec.steps["recorded"]]["step"].tolist()
            steps = sorted(rs or rec.steps["step"].tolist())
        old, old_steps = self.step_slider.value, self.steps
        at_end = not self._steps_filled or old == old_steps[-1]
        self.steps = steps
        stride = math.gcd(*[b - a for a, b in zip(steps, steps[1:])]) if len(steps) > 1 else 1
        slider = self.step_slider
        with slider.hold_trait_notifications():
            slider.min, slider.max = min(slider.min, steps[0]), max(slider.max, steps[-1])
            slider.value = old if old in steps and not at_end else steps[-1]
            slider.min, slider.max, slider.step = steps[0], steps[-1], max(stride, 1)
        self._steps_filled = True

    def _nearest_step(self, step: int) -> int:
        """The recorded step nearest to ``step`` (the earlier one on a tie)."""
        return min(self.steps, key=lambda s: (abs(s - step), s))

    def _open_on_interesting(self) -> None:
        """Select the first factor that failed (the earliest event's or error's layer), else
        the worst conditioned preconditioning factor of any run."""
        choice = _interesting(self._recordings())
        if choice is None:
            return
        run, layer, factor = choice
        self._busy = True
        try:
            self._recs = self._recordings()
            self.run.options = [r.name for r in self._recs]
            self.run.value = run
            self._fill_layers()
            if layer in [v for _, v in self.layer.options]:
                self.layer.value = layer
                self._fill_factors()
                if factor in self.factor.options:
                    self.factor.value = factor
        finally:
            self._busy = False

    # ------------------------------------------------------------------ drawing
    def _draw_all(self) -> None:
        self._draw_selection()
        self._draw_curves()
        ev = events_figure(self._recs)
        mem = memory_figure(self._recs)
        for target, src in ((self.events, ev), (self.memory, mem)):
            with target.batch_update():
                target.data = ()
                for tr in src.data:
                    target.add_trace(tr)
                target.layout = src.layout
                target.layout.height = 330 if target is self.events else 380
                target.layout.width = FIGURE_WIDTH
                target.layout.autosize = False
        n_ev = sum(len(r.events) for r in self._recs)
        steps = sum(len(r.steps) for r in self._recs)
        self.status.value = (
            f"<b>{len(self._recs)}</b> run(s), <b>{steps}</b> steps, "
            f"<b>{n_ev}</b> NaN/Inf event(s)" + (" · live" if self.live else "")
        )

    def _draw_selection(self) -> None:
        rec = self._current()
        layer, factor, step = self.layer.value, self.factor.value, self.step_slider.value
        eig: list[float] = []
        xs: list[int] = []
        cond_x: list[int] = []
        cond_y: list[float | None] = []
        if rec is not None and factor != _NONE:
            sp = rec.spectra
            sel = sp[(sp["layer"] == layer) & (sp["factor"] == factor) & (sp["step"] == step)]
            xs, eig = sel["index"].tolist(), sel["value"].tolist()
            series = damped_condition(rec).get((layer, factor), [])
            cond_x, cond_y = [s for s, _ in series], _finite([c for _, c in series])
        where = layer_labels(rec).get(layer, layer) if rec is not None else layer
        with self.spectrum.batch_update():
            self.spectrum.data[0].x = xs
            self.spectrum.data[0].y = [v if v > 0 else None for v in eig]
            self.spectrum.layout.title.text = f"Spectrum of {factor} · {where} at step {step}"
        with self.condition.batch_update():
            self.condition.data[0].x = cond_x
            self.condition.data[0].y = cond_y
            self.condition.layout.title.text = f"Condition number of {factor} · {where}"
            self.condition.layout.shapes = [_vline(step)]

    def _draw_curves(self) -> None:
        with self.curves.batch_update():
            self.curves.data = ()
            for i, r in enumerate(self._recs):
                st = r.steps[["step", "loss"]].dropna()
                self.curves.add_scatter(
                    x=st["step"].tolist(),
                    y=_finite(st["loss"].tolist()),
                    mode="lines",
                    name=r.name,
                    line={"color": PALETTE[i % len(PALETTE)]},
                )
            self.curves.layout.shapes = [_vline(self.step_slider.value)]
            losses = [v for r in self._recs for v in r.steps["loss"].tolist()]
            log = log_range_decades(losses) > 3
            self.curves.layout.yaxis = {**LOG_AXIS, "type": "log" if log else "linear"}

    # ------------------------------------------------------------------ events
    def _on_run(self, change: dict) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self._fill_layers()
        finally:
            self._busy = False
        self._draw_selection()

    def _on_layer(self, change: dict) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self._fill_factors()
        finally:
            self._busy = False
        self._draw_selection()

    def _on_selection(self, change: dict) -> None:
        if not self._busy:
            self._draw_selection()

    def _on_step(self, change: dict) -> None:
        if self._busy:
            return
        snapped = self._nearest_step(int(change["new"]))
        if snapped != change["new"]:  # a typed step between recorded ones: move to the nearest
            self.step_slider.value = snapped
            return
        self._draw_selection()
        with self.curves.batch_update():
            self.curves.layout.shapes = [_vline(self.step_slider.value)]

    def _on_recorded(self, recorder: Recorder, step: int) -> None:
        # redrawing rebuilds the recording's frames: at most once per min_interval while
        # training runs, and always when the recorder closes (the final state)
        now = time.monotonic()
        if recorder.closed or now - self._last_refresh >= self.min_interval:
            self.refresh()


def _factor_layers(rec: Recording) -> list[str]:
    """Layers with a preconditioning factor in ``rec``, in first-seen order."""
    return list(dict.fromkeys(ly for ly, _ in preconditioning_factors(rec)))


def _interesting(recs: list[Recording]) -> tuple[str, str, str | None] | None:
    """``(run, layer, factor)`` to open on: the earliest failure of any run whose layer has
    factors, else the factor with the largest condition number of any run."""
    failures = []
    for r in recs:
        hit = first_failure(r)
        if hit is not None and hit[1] in _factor_layers(r):
            failures.append((hit[0], r.name, hit[1], hit[2]))
    if failures:
        _, run, layer, factor = min(failures, key=lambda f: f[0])
        return run, layer, factor
    worst = [(w[2], r.name, w[0], w[1]) for r in recs if (w := worst_conditioned(r))]
    if worst:
        _, run, layer, factor = max(worst, key=lambda w: w[0])
        return run, layer, factor
    return None


def _vline(step: Any) -> dict:
    """A vertical dotted line at ``step`` (marks the slider position)."""
    return {"type": "line", "x0": step, "x1": step, "xref": "x", "y0": 0, "y1": 1,
            "yref": "paper", "line": {"dash": "dot", "color": "#888"}}  # fmt: skip


def dashboard(source: Any, live: bool = False, min_interval: float = 1.0) -> Dashboard:
    """An ipywidgets dashboard for a Recording / Recorder (or a list / dict of them).

    Dropdowns choose run, layer and factor; the slider chooses the recorded step. With
    ``live=True`` (needs a Recorder) the figures redraw after recorded steps while
    training runs in the same notebook, at most once per ``min_interval`` seconds (a
    redraw rebuilds the recording's frames, so its cost grows with the recorded steps)
    and once more when the recorder closes; ``refresh()`` redraws on demand,
    ``close_live()`` stops listening.
    """
    return Dashboard(source, live=live, min_interval=min_interval)
