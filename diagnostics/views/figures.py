"""Plotly figures of one or several `Recording`s (the instruments; `metrics` holds the quantities).

Every function takes one recording, a `Recorder`, or a list / dict of them (a dict's keys
name the runs) and returns a ``plotly.graph_objects.Figure``. Controls are plotly's own
(dropdowns), so the figures work in static HTML without a kernel.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from diagnostics.record.recording import PHASES, Recording
from diagnostics.views.style import (
    LOG_AXIS,
    added_damping,
    component_colours,
    damped_condition,
    is_preconditioning,
    layer_labels,
    log_range_decades,
    preconditioning_factors,
)

PALETTE = qualitative.Plotly
PHASE_STYLE = {
    "forward": ("circle", "#1f77b4"),
    "backward": ("diamond", "#ff7f0e"),
    "preconditioner update": ("square", "#2ca02c"),
    "parameter update": ("x", "#d62728"),
}
IMAGE_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg",
                 ".webp": "webp"}  # fmt: skip


def as_recordings(source: Any) -> list[Recording]:
    """Normalise a Recording / Recorder / list / dict of them to a list of Recordings.

    Runs keep their names; duplicate names get a suffix `` (2)``, `` (3)``, ... so that
    every run can be told apart in legends and dropdowns.
    """
    if isinstance(source, Mapping):
        items = [(str(k), _one(v)) for k, v in source.items()]
        recs = [_renamed(r, k) for k, r in items]
    elif isinstance(source, (list, tuple)):
        recs = [_one(v) for v in source]
    else:
        recs = [_one(source)]
    if not recs:
        raise ValueError("recordings must hold at least one Recording")
    seen: dict[str, int] = {}
    out = []
    for r in recs:
        n = seen.get(r.name, 0) + 1
        seen[r.name] = n
        out.append(r if n == 1 else _renamed(r, f"{r.name} ({n})"))
    return out


def _one(obj: Any) -> Recording:
    """One Recording from a Recording or a Recorder."""
    if isinstance(obj, Recording):
        return obj
    rec = getattr(obj, "recording", None)
    if isinstance(rec, Recording):
        return rec
    raise TypeError(
        f"expected a diagnostics.Recording or Recorder (or a list/dict of them), "
        f"got {type(obj).__name__}"
    )


def _renamed(r: Recording, name: str) -> Recording:
    """A shallow copy of ``r`` with another name (frames are shared, not copied)."""
    if r.name == name:
        return r
    return dataclasses.replace(r, name=name)


def _empty(fig: go.Figure, text: str) -> go.Figure:
    """Put a centred note on an empty figure."""
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _finite(values: Iterable[float]) -> list[float | None]:
    """Values with NaN/Inf replaced by None (a gap in plotly)."""
    return [v if v is not None and math.isfinite(v) else None for v in values]


def human_bytes(n: float) -> str:
    """A byte count with a binary unit: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------- spectra


def _round_sig(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits (NaN, Inf and 0 kept)."""
    out = np.array(values, dtype=np.float64)
    ok = np.isfinite(out) & (out != 0)
    mag = np.floor(np.log10(np.abs(out[ok])))
    scale = 10.0 ** (digits - 1 - mag)
    out[ok] = np.round(out[ok] * scale) / scale
    return out


def spectrum_figure(
    recordings: Any, *, layer: str | None = None, factor: str | None = None
) -> go.Figure:
    """Eigenvalues of each preconditioner factor over steps, as heatmaps (log10 colour).

    x: step; y: eigenvalue rank (0 = largest); one heatmap per run x layer x factor, picked
    with a dropdown. Eigenvalues are those of ``K K^T`` / ``C C^T`` for SINGD (squared
    singular values of K, C), of the factors themselves for KFAC.
    """
    recs = as_recordings(recordings)
    fig = go.Figure()
    combos: list[tuple[str, str, str]] = []
    for r in recs:
        sp = r.spectra
        if layer is not None:
            sp = sp[sp["layer"] == layer]
        if factor is not None:
            sp = sp[sp["factor"] == factor]
        sp = sp[[is_preconditioning(str(f)) for f in sp["factor"]]]
        if len(sp) == 0:
            continue
        labels = layer_labels(r)
        for (ly, fa), part in sp.groupby(["layer", "factor"], sort=False):
            grid = part.pivot_table(index="index", columns="step", values="value", aggfunc="first")
            vals = grid.to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(vals > 0, np.log10(vals), np.nan)
            # rounded to what the colours and the hover (4 significant digits) can show:
            # a long run's spectra otherwise take megabytes of JSON in a notebook or report
            fig.add_trace(
                go.Heatmap(
                    x=grid.columns.tolist(),
                    y=grid.index.tolist(),
                    z=np.round(z, 4).tolist(),
                    customdata=_round_sig(vals, 5).tolist(),
                    colorscale="Viridis",
                    colorbar={"title": {"text": "log10 eig"}},
                    hovertemplate="step %{x}<br>rank %{y}<br>eigenvalue %{customdata:.4g}"
                    "<extra></extra>",
                    name=f"{r.name} · {labels.get(str(ly), ly)} · {fa}",
                    visible=not combos,
                )
            )
            combos.append((r.name, labels.get(str(ly), str(ly)), str(fa)))
    if not combos:
        return _empty(fig, "no spectra recorded (optimizer without factors, or spectra=False)")
    multi = len(recs) > 1

    def label(c: tuple[str, str, str]) -> str:
        return f"{c[0]} · {c[1]} · {c[2]}" if multi else f"{c[1]} · {c[2]}"

    buttons = [
        {
            "label": label(c),
            "method": "update",
            "args": [
                {"visible": [j == i for j in range(len(combos))]},
                {"title": {"text": f"Spectrum over steps: {label(c)}"}},
            ],
        }
        for i, c in enumerate(combos)
    ]
    fig.update_layout(
        title={"text": f"Spectrum over steps: {label(combos[0])}"},
        xaxis_title="step",
        yaxis_title="eigenvalue rank (0 = largest)",
        updatemenus=[
            {
                "buttons": buttons,
                "x": 1.0,
                "xanchor": "right",
                "y": 1.0,
                "yanchor": "bottom",
                "pad": {"b": 8},
                "showactive": True,
            }
        ],  # fmt: skip
        margin={"t": 110},
        # tall enough that the open dropdown (about 21 px an entry) stays inside the figure
        height=max(450, 160 + 21 * len(buttons)),
    )
    fig.update_yaxes(autorange="reversed")
    return fig


# ---------------------------------------------------------------------------- conditions


def condition_figure(
    recordings: Any, *, factor: str | None = None, metric: str = "cond", run: str | None = None
) -> go.Figure:
    """Condition number (or another factor metric) of each preconditioning factor over steps,
    one run at a time: plotly's own dropdown picks the run (``run`` is shown first).

    Only factors that precondition are drawn (not optimizer moments such as AdamW's
    ``exp_avg_sq``, not stored inverses). Where the optimizer inverts a damped factor (KFAC:
    ``A + λI``) the line is the condition number of that damped matrix, the one that is
    inverted; the undamped factor's line is one legend click away. Log y axis with 10^k
    ticks; non-finite values leave gaps.
    """
    recs = as_recordings(recordings)
    fig = go.Figure()
    groups: list[tuple[str, int, int]] = []  # run, first trace, end
    for r in recs:
        start = len(fig.data)
        fig.add_traces(_condition_traces(r, factor, metric))
        if len(fig.data) > start:
            groups.append((r.name, start, len(fig.data)))
    if not groups:
        return _empty(fig, f"no '{metric}' of preconditioner factors recorded "
                           "(first-order optimizers have none)")  # fmt: skip
    defaults = [t.visible for t in fig.data]  # True, or "legendonly" for undamped factors

    def visible(g: tuple[str, int, int]) -> list[Any]:
        return [d if g[1] <= j < g[2] else False for j, d in enumerate(defaults)]

    def title(name: str) -> str:
        what = "Condition number per layer" if metric == "cond" else metric
        return f"{what}: {name}" if len(recs) > 1 else what

    names = [g[0] for g in groups]
    shown = names.index(run) if run in names else 0
    for j, v in enumerate(visible(groups[shown])):
        fig.data[j].visible = v
    buttons = [
        {"label": g[0], "method": "update",
         "args": [{"visible": visible(g)}, {"title": {"text": title(g[0])}}]}
        for g in groups
    ]  # fmt: skip
    menus = [{"buttons": buttons, "active": shown, "x": 1.0, "xanchor": "right", "y": 1.0,
              "yanchor": "bottom", "pad": {"b": 8}}]  # fmt: skip
    fig.update_layout(
        title={"text": title(names[shown])},
        xaxis_title="step",
        yaxis={**LOG_AXIS, "title": {"text": "condition number" if metric == "cond" else metric}},
        updatemenus=menus if len(groups) > 1 else [],
        margin={"t": 100},
        legend={"font": {"size": 11}},
    )
    return fig


def _condition_traces(r: Recording, factor: str | None, metric: str) -> list[go.Scatter]:
    """One run's lines: per preconditioning factor, its (damped) metric over steps."""
    pairs = [p for p in preconditioning_factors(r) if factor is None or p[1] == factor]
    if not pairs:
        return []
    labels = layer_labels(r)
    m = r.metrics[r.metrics["metric"] == metric]
    raw = {k: g.sort_values("step") for k, g in m.groupby(["layer", "factor"])}
    used = damped_condition(r) if metric == "cond" else {}
    layers = list(dict.fromkeys(ly for ly, _ in pairs))
    sides = list(dict.fromkeys(fa for _, fa in pairs))
    dashes = ["solid", "dash", "dot", "dashdot"]
    traces = []
    for ly, fa in pairs:
        style = {"color": PALETTE[layers.index(ly) % len(PALETTE)],
                 "dash": dashes[sides.index(fa) % len(dashes)]}  # fmt: skip
        label = f"{labels.get(ly, ly)} · {fa}"
        lam = added_damping(r, fa, ly) if metric == "cond" else None
        if lam is not None and (ly, fa) in used:
            steps, values = zip(*used[(ly, fa)]) if used[(ly, fa)] else ((), ())
            what = f"cond({fa} + λI), λ = {lam:g}: the matrix the optimizer inverts"
            traces.append(_line(r.name, f"{label} + λI", list(steps), values, style, what))
            if (ly, fa) in raw:
                part, faint = raw[(ly, fa)], {**style, "dash": "dot", "width": 1}
                traces.append(_line(r.name, f"{label} (undamped)", part["step"].tolist(),
                                    part["value"].tolist(), faint, f"cond({fa}) without damping",
                                    visible="legendonly"))  # fmt: skip
        elif (ly, fa) in raw:
            part = raw[(ly, fa)]
            what = f"{metric}({fa}·{fa}ᵀ)" if fa in ("K", "C") else f"{metric}({fa})"
            traces.append(_line(r.name, label, part["step"].tolist(), part["value"].tolist(),
                                style, what))  # fmt: skip
    return traces


def _line(
    run: str, name: str, x: list[int], y: Iterable[float], line: dict, what: str,
    visible: bool | str = True,
) -> go.Scatter:  # fmt: skip
    """One condition-number line; its hover says the run, the layer and what is plotted."""
    return go.Scatter(
        x=x,
        y=_finite(y),
        mode="lines+markers",
        name=name,
        legendgroup=run,
        line=line,
        marker={"size": 5},
        visible=visible,
        hovertemplate=f"{run}<br>{name}<br>{what}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
    )


# ---------------------------------------------------------------------------- events


def events_figure(recordings: Any) -> go.Figure:
    """NaN/Inf events over steps: one marker per event, styled by phase, with every field."""
    recs = as_recordings(recordings)
    fig = go.Figure()
    frames = []
    for r in recs:
        ev = r.events.copy()
        errors = getattr(r, "errors", None)
        if errors is not None and len(errors):  # errors in their own table since it exists
            ev = pd.concat([ev, errors.assign(tensor=errors["tensor"].replace("", "error"))],
                           ignore_index=True)  # fmt: skip
        if len(ev):
            ev["run"] = r.name
            frames.append(ev)
    if not frames:
        return _empty(fig, "no NaN/Inf events")
    ev = pd.concat(frames, ignore_index=True)
    if "message" not in ev:
        ev["message"] = ""
    ev["message"] = ev["message"].fillna("")
    multi = len(recs) > 1
    labels = {r.name: layer_labels(r) for r in recs}
    where = [labels[run].get(str(ly), str(ly)) for run, ly in zip(ev["run"], ev["layer"])]
    ev["where"] = (ev["run"] + " · " if multi else "") + pd.Series(where, index=ev.index)
    fields = ["run", "phase", "layer", "tensor", "dtype", "shape", "n_nan", "n_posinf",
              "n_neginf", "finite_absmax", "grad_scale", "skipped", "message"]  # fmt: skip
    if "message" not in ev:
        ev["message"] = ""
    template = (
        "step %{x}<br>run %{customdata[0]}<br>phase %{customdata[1]}<br>"
        "layer %{customdata[2]} · tensor %{customdata[3]}<br>"
        "dtype %{customdata[4]} · shape %{customdata[5]}<br>"
        "NaN %{customdata[6]} · +Inf %{customdata[7]} · -Inf %{customdata[8]}<br>"
        "largest finite |x| %{customdata[9]:.4g}<br>grad scale %{customdata[10]}<br>"
        "skipped %{customdata[11]}<br>%{customdata[12]}<extra></extra>"
    )
    phases = list(PHASES) + sorted(set(ev["phase"]) - set(PHASES))
    is_error = ev["message"].astype(str) != ""
    groups = [(p, ev[(ev["phase"] == p) & ~is_error], p) for p in phases]
    groups += [(p, ev[(ev["phase"] == p) & is_error], f"error ({p})") for p in phases]
    for phase, part, name in groups:
        if len(part) == 0:
            continue
        symbol, color = PHASE_STYLE.get(phase, ("star", "#7f7f7f"))
        if name != phase:  # an error that ended the run (Recorder.record_error)
            symbol, color = "x", "#d62728"
        cd = part[fields].astype(object).where(part[fields].notna(), None).values.tolist()
        fig.add_trace(
            go.Scatter(
                x=part["step"].tolist(),
                y=(part["where"] + " / " + part["tensor"]).tolist(),
                mode="markers",
                name=name,
                marker={
                    "symbol": symbol,
                    "color": color,
                    "size": 11 if name == phase else 14,
                    "line": {"width": 1, "color": "#333"},
                },  # fmt: skip
                customdata=cd,
                hovertemplate=template,
            )
        )
    fig.update_layout(
        title={
            "text": f"NaN/Inf events ({int((ev['message'] == '').sum())})"
            + (f" · errors ({n})" if (n := int((ev["message"] != "").sum())) else "")
        },
        xaxis_title="step",
        yaxis_title="layer / tensor",
        legend_title_text="phase",
    )
    fig.update_yaxes(type="category")
    return fig


# ---------------------------------------------------------------------------- memory


def memory_figure(recordings: Any, *, step: int | None = None) -> go.Figure:
    """Optimizer state bytes, stacked by component, per run and layer (last recorded step).

    The x axis groups layers under runs, so runs are compared side by side.
    """
    recs = as_recordings(recordings)
    rows = []
    for r in recs:
        sb = r.state_bytes(step)
        labels = layer_labels(r)
        for row in sb.itertuples():
            layer = labels.get(str(row.layer), str(row.layer))
            rows.append((r.name, layer, str(row.component), int(row.bytes)))
    fig = go.Figure()
    if not rows:
        return _empty(fig, "no optimizer state recorded")
    df = pd.DataFrame(rows, columns=["run", "layer", "component", "bytes"])
    order = list(dict.fromkeys(df["component"]))
    colours = component_colours(order)
    keys = list(dict.fromkeys(zip(df["run"], df["layer"])))
    for comp in order:
        part = df[df["component"] == comp].set_index(["run", "layer"])["bytes"]
        ys = [int(part.get(k, 0)) for k in keys]
        fig.add_trace(
            go.Bar(
                x=[[k[0] for k in keys], [k[1] for k in keys]],
                y=ys,
                name=comp,
                marker_color=colours[comp],
                customdata=[human_bytes(v) for v in ys],
                hovertemplate=f"{comp}<br>%{{x}}<br>%{{customdata}} (%{{y}} B)<extra></extra>",
            )
        )
    totals = df.groupby("run", sort=False)["bytes"].sum()
    sub = " · ".join(f"{k}: {human_bytes(v)}" for k, v in totals.items())
    fig.update_layout(
        barmode="stack",
        title={"text": f"Optimizer state by layer and component<br><sup>{sub}</sup>"},
        yaxis_title="bytes",
        legend_title_text="component",
    )
    return fig


# ---------------------------------------------------------------------------- curves


#: Accuracies training code puts into ``Recording.summary``, with their legend names.
SUMMARY_ACCURACIES = {"train_accuracy": "train", "val_accuracy": "validation",
                      "test_accuracy": "test"}  # fmt: skip


def curves_figure(
    recordings: Any, *, metrics: Iterable[str] | None = None, log_loss: bool | None = None
) -> go.Figure:
    """Loss (and accuracy-like step columns, e.g. ``accuracy``) over steps, one line per run,
    and a panel of the accuracies each run's summary holds (train / validation / test).

    ``metrics`` defaults to ``loss`` plus every logged step column whose name contains
    ``acc``. The loss axis has linear / log buttons (plotly's own); ``log_loss=None`` starts
    on log when the finite losses span more than 3 decades. The legend sits below the plot.
    """
    recs = as_recordings(recordings)
    if metrics is None:
        extra: list[str] = []
        for r in recs:
            extra += [c for c in r.steps.columns if "acc" in c.lower() and c not in extra]
        metrics = ["loss", *extra]
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one column of recording.steps")
    accs = [k for k in SUMMARY_ACCURACIES if any(_number(r.summary.get(k)) for r in recs)]
    titles = [*metrics, "accuracy at the end of each run"] if accs else metrics
    legend_rows = (len(recs) + 2) // 3 + (1 if accs else 0)
    height = 120 + 300 * len(metrics) + (260 if accs else 0) + 22 * legend_rows
    plot_height = height - 90 - (60 + 22 * legend_rows)
    fig = make_subplots(rows=len(titles), cols=1, subplot_titles=titles,
                        vertical_spacing=min(0.3, 90 / plot_height))  # fmt: skip
    for ri, r in enumerate(recs):
        for mi, metric in enumerate(metrics):
            if metric in r.steps.columns:
                fig.add_trace(_curve(r, metric, PALETTE[ri % len(PALETTE)], mi == 0), mi + 1, 1)
    if accs:
        _add_accuracy_bars(fig, recs, accs, len(titles))
    for mi in range(1, len(metrics)):
        fig.update_xaxes(matches="x", row=mi + 1, col=1)
    fig.update_xaxes(title_text="step", row=len(metrics), col=1)
    losses = [v for r in recs for v in r.steps["loss"].tolist()] if "loss" in metrics else []
    menus = []
    if "loss" in metrics:
        row = metrics.index("loss") + 1
        log = log_range_decades(losses) > 3 if log_loss is None else bool(log_loss)
        fig.update_yaxes(**{**LOG_AXIS, "type": "log" if log else "linear"}, row=row, col=1)
        menus = [_axis_buttons("yaxis" if row == 1 else f"yaxis{row}", log)]
    fig.update_layout(
        title={"text": "Training curves"},
        height=height,
        updatemenus=menus,
        barmode="group",
        legend={
            "orientation": "h",
            "yanchor": "top",
            "y": -60 / plot_height,
            "x": 0,
            "xanchor": "left",
        },  # fmt: skip
        margin={"t": 90, "b": 60 + 22 * legend_rows},
    )
    return fig


def _number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curve(r: Recording, metric: str, color: str, legend: bool) -> go.Scatter:
    """One run's ``metric`` over steps; the legend name carries its test accuracy."""
    part = r.steps[["step", metric]].dropna()
    acc = r.summary.get("test_accuracy")
    name = f"{r.name} (test acc {acc:.3f})" if _number(acc) else r.name
    return go.Scatter(
        x=part["step"].tolist(),
        y=_finite(part[metric].tolist()),
        mode="lines" if len(part) > 30 else "lines+markers",
        name=name,
        legendgroup=r.name,
        showlegend=legend,
        line={"color": color},
        hovertemplate=f"{r.name}<br>step %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
    )


def _add_accuracy_bars(fig: go.Figure, recs: list[Recording], keys: list[str], row: int) -> None:
    """Grouped bars of each run's summary accuracies (train / validation / test) in ``row``."""
    shades = {"train_accuracy": "#c7c7c7", "val_accuracy": "#7f7f7f", "test_accuracy": "#2a3f5f"}
    for key in keys:
        ys = [r.summary.get(key) if _number(r.summary.get(key)) else None for r in recs]
        fig.add_trace(
            go.Bar(
                x=[r.name for r in recs],
                y=ys,
                name=f"{SUMMARY_ACCURACIES[key]} accuracy",
                marker_color=shades[key],
                hovertemplate=f"%{{x}}<br>{SUMMARY_ACCURACIES[key]} accuracy %{{y:.3f}}"
                "<extra></extra>",
            ),
            row,
            1,
        )
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=row, col=1)


def _axis_buttons(axis: str, log: bool) -> dict:
    """Plotly buttons that switch ``axis`` between a linear and a log scale."""
    return {
        "type": "buttons",
        "direction": "right",
        "active": 1 if log else 0,
        "x": 1.0,
        "xanchor": "right",
        "y": 1.0,
        "yanchor": "bottom",
        "pad": {"b": 30},
        "buttons": [
            {"label": "linear loss", "method": "relayout", "args": [{f"{axis}.type": "linear"}]},
            {"label": "log loss", "method": "relayout", "args": [{f"{axis}.type": "log"}]},
        ],
    }


def all_figures(recordings: Any) -> dict[str, go.Figure]:
    """Every figure for the runs, keyed by a short name (the report shows them in this order);
    ``"eig_min"`` only where a run has symmetric factors with a damping (KFAC)."""
    recs = as_recordings(recordings)
    out = {
        "curves": curves_figure(recs),
        "condition": condition_figure(recs),
        "spectrum": spectrum_figure(recs),
        "events": events_figure(recs),
        "memory": memory_figure(recs),
    }
    eig = eig_min_figure(recs)
    if len(eig.data):
        out["eig_min"] = eig
    return out


def save_figure(fig: go.Figure, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``fig`` to ``path``; the suffix picks the format.

    ``.html`` (self-contained, plotly.js inlined), ``.json`` (plotly JSON), or a static
    image via kaleido: ``.png``, ``.svg``, ``.pdf``, ``.jpg``/``.jpeg``, ``.webp``
    (kaleido >= 1 needs a Chrome/Chromium it can find). Extra keyword arguments go to
    the writer (e.g. ``scale=2`` for images).
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig must be a plotly.graph_objects.Figure, got {type(fig).__name__}")
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        fig.write_html(path, include_plotlyjs=True, full_html=True, **kwargs)
    elif suffix == ".json":
        fig.write_json(path, **kwargs)
    elif suffix in IMAGE_FORMATS:
        fig.write_image(path, format=IMAGE_FORMATS[suffix], **kwargs)
    else:
        valid = ", ".join([".html", ".json", *IMAGE_FORMATS])
        raise ValueError(f"path suffix {suffix or '(none)'!r} is not supported; use one of {valid}")
    return path


def eig_min_figure(recordings: Any) -> go.Figure:
    """The smallest eigenvalue of each symmetric factor (KFAC's A, G) over steps, signed, on
    a linear axis, against ``-damping`` of its layer: a factor whose smallest eigenvalue
    reaches ``-damping`` makes ``factor + damping I`` singular (the Cholesky fails). Open
    markers: power-iteration estimates (an upper bound: the true value may be lower)."""
    recs = as_recordings(recordings)
    fig = go.Figure()
    multi = len(recs) > 1
    n = 0
    for r in recs:
        m = r.metrics
        damped = m[m["metric"] == "cond_damped"][["layer", "factor"]].drop_duplicates()
        damping = m[(m["factor"] == "(optimizer)") & (m["metric"] == "damping")]
        for layer, factor in damped.itertuples(index=False):
            rows = m[(m["layer"] == layer) & (m["factor"] == factor) & (m["metric"] == "eig_min")]
            est = m[(m["layer"] == layer) & (m["factor"] == factor)]
            est = set(est[(est["metric"] == "spectrum_estimated") & (est["value"] > 0)]["step"])
            symbols = ["circle-open" if step in est else "circle" for step in rows["step"]]
            name = (f"{r.name} · " if multi else "") + f"{layer} · {factor}"
            color = PALETTE[n % len(PALETTE)]
            n += 1
            fig.add_trace(
                go.Scatter(
                    x=rows["step"].tolist(), y=_finite(rows["value"]), mode="lines+markers",
                    name=name, line={"color": color}, legendgroup=name,
                    marker={"symbol": symbols, "size": 7},
                    hovertemplate=f"{name}<br>step %{{x}}<br>smallest eigenvalue %{{y:.4g}}"
                    "<extra></extra>",
                )
            )  # fmt: skip
            d = damping[damping["layer"] == layer]
            if len(d):
                fig.add_trace(
                    go.Scatter(
                        x=d["step"].tolist(), y=(-d["value"]).tolist(), mode="lines",
                        name=f"−damping ({name})", legendgroup=name, showlegend=False,
                        line={"color": color, "dash": "dash"},
                        hovertemplate="step %{x}<br>−damping %{y:.4g}<extra></extra>",
                    )
                )  # fmt: skip
    if n == 0:
        return _empty(fig, "no symmetric factors with a damping (KFAC) recorded")
    fig.add_hline(y=0.0, line={"color": "#999", "width": 1})
    fig.update_layout(
        title={"text": "smallest eigenvalue of each factor (dashed: −damping; open: estimate)"},
        xaxis_title="step",
        yaxis_title="smallest eigenvalue (signed)",
    )
    return fig
