"""`diagnose(recording)`: where trouble started, what stalled, and the evidence.

Works from a `Recording` alone (SINGD, KFAC or any torch optimizer). Each per-layer series
of the recorded steps is compared with its own recent range, the ``window`` recorded
values before it:

- activations (``output`` RMS of each layer's forward): up or down by ``activation``x;
- parameters (``param`` norm per layer): up or down by ``parameter``x;
- updates (``update`` norm per layer): up by ``update``x;
- factor conditioning (``cond`` of K/C, ``cond_damped`` of A/G): up by ``conditioning``x,
  and a symmetric factor whose smallest eigenvalue is below ``-damping / 2``;
- any non-finite value, and the NaN/Inf events (except the loss and layer inputs).

A finite value is judged only once its series has ``window`` recorded values (the first
steps of training move fast). Activations of SINGD's factor-update guard (``guard_reach``
rows) are findings of kind ``"guard"``, one per layer and factor; they are evidence, never
the origin.

The origin is the first of these by (step, phase, position in the forward pass): within a
step the forward pass (activations, events) comes before factors and then parameters and
updates, so a layer whose output blows up is named before the layers upstream whose
gradients and updates it blew up in the same step's backward pass, and before the layers
downstream that only inherited it. The loss is never an origin: a loss that jumps and
stays up without any NaN (a silent death), or gradients that vanish, are findings of the
model. Stalled parameters are those whose update was zero, or whose elements with a
non-zero gradient did not move (``stuck_frac`` >= `STALL_FRACTION`), on every recorded
step with a non-zero gradient (at least two).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.record.quantities.base import MODEL
from diagnostics.record.quantities.rounding import STALL_FRACTION
from diagnostics.record.recording import Recording

__all__ = ["Diagnosis", "diagnose"]

FINDING_COLUMNS = ["step", "layer", "factor", "kind", "evidence", "message"]
_RANK = {"forward": 0, "backward": 2, "preconditioner update": 3, "parameter update": 4}


@dataclass
class Diagnosis:
    """What `diagnose` found: the origin layer, stalled parameters and all findings."""

    origin: str | None
    origin_step: int | None
    stalled: list[str]
    findings: pd.DataFrame
    kinds: dict[str, str] = field(default_factory=dict)
    run: str = "run"

    def headline(self) -> str:
        """One sentence: where trouble started, or that nothing left its range."""
        if self.origin is None:
            return "No layer left its recent range."
        f = self.findings
        first = f[(f["layer"] == self.origin) & (f["step"] == self.origin_step)].iloc[0]
        kind = self.kinds.get(self.origin, "")
        what = f" ({kind})" if kind else ""
        return f"Trouble started in {self.origin}{what} at step {self.origin_step}: {first.message}"

    def __str__(self) -> str:
        lines = [f"diagnose({self.run!r})", self.headline()]
        if self.stalled:
            lines.append("Stalled (never moved while their gradients were non-zero): ")
            lines[-1] += ", ".join(self.stalled)
        if len(self.findings):
            lines.append(f"Findings ({len(self.findings)}, first 12):")
            for r in self.findings.head(12).itertuples(index=False):
                where = r.layer + (f" {r.factor}" if r.factor else "")
                lines.append(f"  step {r.step:>5}  {r.kind:<13} {where}: {r.message}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The headline, the stalled parameters and the findings table, for notebooks."""
        parts = [f"<p><b>{html.escape(self.headline())}</b></p>"]
        if self.stalled:
            names = ", ".join(html.escape(s) for s in self.stalled)
            parts.append(f"<p>Stalled: {names}</p>")
        parts.append(self.findings.to_html(index=False, escape=True, max_rows=40))
        return "\n".join(parts)


@dataclass(frozen=True)
class _Signal:
    """One per-layer series to watch: which metric rows, its phase rank, its thresholds."""

    kind: str
    factor: Any  # a factor name, or a tuple of names
    metric: str
    rank: int
    up: float
    down: float | None


def diagnose(
    recording: Recording,
    *,
    window: int = 5,
    activation: float = 4.0,
    parameter: float = 2.0,
    update: float = 10.0,
    conditioning: float = 100.0,
) -> Diagnosis:
    """Find where trouble started in ``recording`` (see the module docstring)."""
    if not isinstance(recording, Recording):
        raise TypeError(f"recording must be a Recording, got {type(recording).__name__}")
    order, kinds = _layer_order(recording)
    signals = [
        _Signal("activation", "output", "rms", 0, activation, activation),
        _Signal("parameter", "param", "norm", 4, parameter, parameter),
        _Signal("update", "update", "norm", 4, update, None),
        _Signal("conditioning", ("K", "C"), "cond", 3, conditioning, None),
        _Signal("conditioning", ("A", "G"), "cond_damped", 3, conditioning, None),
    ]
    found: list[dict[str, Any]] = []
    m = recording.metrics
    for sig in signals:
        found += _range_findings(m, sig, window)
    found += _error_findings(recording.errors, order)  # before its evidence in the same step
    found += _definiteness_findings(m)
    found += _event_findings(recording.events)
    found += _loss_findings(recording.steps, window)
    found += _guard_findings(m)
    stalled, stall_rows = _stalled(m)
    found += stall_rows + _rounding_findings(m)

    def key(f: dict[str, Any]) -> tuple:
        return (f["step"], f["rank"], order.get(f["layer"], len(order)), f["layer"])

    found.sort(key=key)
    blame = [f for f in found if f["origin"]]
    origin = blame[0] if blame else None
    df = pd.DataFrame([{c: f[c] for c in FINDING_COLUMNS} for f in found], columns=FINDING_COLUMNS)
    df["step"] = df["step"].astype("int64")
    return Diagnosis(
        origin=origin["layer"] if origin else None,
        origin_step=int(origin["step"]) if origin else None,
        stalled=stalled,
        findings=df,
        kinds=kinds,
        run=recording.name,
    )


def _layer_order(recording: Recording) -> tuple[dict[str, int], dict[str, str]]:
    """Each layer's forward position and kind from ``meta["layers"]`` (else first seen)."""
    order: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for entry in recording.meta.get("layers") or []:
        if isinstance(entry, dict) and "layer" in entry:
            order.setdefault(str(entry["layer"]), len(order))
            kinds[str(entry["layer"])] = str(entry.get("kind", ""))
    for layer in recording.metrics["layer"].unique():
        order.setdefault(str(layer), len(order))
    return order, kinds


def _finding(step, layer, factor, kind, evidence, message, rank, origin=True) -> dict[str, Any]:
    """One finding row (with its sort rank and whether it may be the origin)."""
    return {
        "step": int(step),
        "layer": str(layer),
        "factor": str(factor),
        "kind": kind,
        "evidence": evidence,
        "message": message,
        "rank": rank,
        "origin": origin and layer != MODEL,
    }


def _range_findings(m: pd.DataFrame, sig: _Signal, window: int) -> list[dict[str, Any]]:
    """The first step at which each (layer, factor) series of ``sig`` left its recent range."""
    factors = sig.factor if isinstance(sig.factor, tuple) else (sig.factor,)
    rows = m[(m["metric"] == sig.metric) & m["factor"].isin(factors)]
    out = []
    for (layer, factor), g in rows.groupby(["layer", "factor"], sort=False):
        steps, vals = g["step"].to_numpy(), g["value"].to_numpy(dtype=float)
        for i, v in enumerate(vals):
            if i < window and math.isfinite(v):
                continue  # early training moves fast: judged once a full window is recorded
            hit = _left_range(v, vals[max(0, i - window) : i], sig.up, sig.down)
            if hit is None:
                continue
            what = f"{factor} {sig.metric}" if sig.kind != "activation" else "output rms"
            out.append(_finding(steps[i], layer, factor, sig.kind, hit, f"{what} {hit}", sig.rank))
            break
    return out


def _left_range(v: float, recent: np.ndarray, up: float, down: float | None) -> str | None:
    """Evidence text when ``v`` lies outside ``recent`` widened by ``up`` / ``down``."""
    recent = recent[np.isfinite(recent)]
    if not math.isfinite(v):
        return f"became {v} (was {_fmt(recent[-1])})" if len(recent) else None
    if len(recent) < 2:
        return None
    lo, hi = float(recent.min()), float(recent.max())
    span = f"recent range {_fmt(lo)}–{_fmt(hi)}"
    if hi > 0 and v > up * hi:
        return f"rose to {_fmt(v)} ({span}, ×{_fmt(v / hi)})"
    if down is not None and lo > 0 and v < lo / down:
        return f"fell to {_fmt(v)} ({span})"
    return None


def _fmt(x: float) -> str:
    """A number in 3 significant digits."""
    return f"{x:.3g}"


def _definiteness_findings(m: pd.DataFrame) -> list[dict[str, Any]]:
    """Symmetric factors whose smallest eigenvalue fell below ``-damping / 2``."""
    damp = m[(m["factor"] == "(optimizer)") & (m["metric"] == "damping")]
    if not len(damp):
        return []
    d = damp.set_index(["step", "layer"])["value"]
    eig = m[(m["metric"] == "eig_min") & m["factor"].isin(["A", "G"])]
    out, seen = [], set()
    for r in eig.itertuples(index=False):
        lam = d.get((r.step, r.layer))
        if lam is None or (r.layer, r.factor) in seen or not r.value < -lam / 2:
            continue
        seen.add((r.layer, r.factor))
        ev = f"smallest eigenvalue {_fmt(r.value)}, damping {_fmt(lam)}"
        msg = f"{r.factor} lost definiteness: {ev} (F + damping I near singular)"
        out.append(_finding(r.step, r.layer, r.factor, "conditioning", ev, msg, 3))
    return out


def _event_findings(events: pd.DataFrame) -> list[dict[str, Any]]:
    """The first NaN/Inf event of each (layer, phase), the loss and layer inputs excluded
    as origins (an input is the previous layer's output)."""
    out, seen = [], set()
    for r in events.sort_values(["step", "order"]).itertuples(index=False):
        if (r.layer, r.phase, r.tensor) in seen:
            continue
        seen.add((r.layer, r.phase, r.tensor))
        counts = f"NaN {r.n_nan}, +Inf {r.n_posinf}, -Inf {r.n_neginf} of {r.numel}"
        blame = r.layer != MODEL and not str(r.tensor).startswith("input")
        msg = f"{r.tensor} ({r.phase}) holds non-finite values"
        out.append(
            _finding(
                r.step, r.layer, r.tensor, "nan/inf", counts, msg, _RANK.get(r.phase, 5), blame
            )
        )
    return out


def _error_findings(errors: pd.DataFrame, order: dict[str, int]) -> list[dict[str, Any]]:
    """Each recorded error, at its layer (or at a known layer its message names as
    ``layer 'NAME'``, as KFAC's inverse failure does): an origin when it has one."""
    out = []
    for r in errors.itertuples(index=False):
        layer = r.layer
        named = re.search(r"layer '([^']+)'", str(r.message))
        if layer == MODEL and named and named.group(1) in order:
            layer = named.group(1)
        rank = _RANK.get(r.phase, 5)
        out.append(_finding(r.step, layer, r.tensor, "error", r.exception, r.message, rank))
    return out


def _loss_findings(steps: pd.DataFrame, window: int) -> list[dict[str, Any]]:
    """Model-level findings (the non-finite loss is an event): a loss that jumped (by more
    than 0.3 and 5x its typical step-to-step change) and stayed up for 3 steps without NaN
    (a silent death), total gradients that vanished (below 1e-3 of their recent maximum)."""
    out = []
    loss = steps["loss"].to_numpy(dtype=float)
    for i in range(window, len(loss) - 2):
        recent = loss[i - window : i]
        after = loss[i : i + 3]
        if not (np.isfinite(recent).all() and np.isfinite(after).all()):
            continue
        noise = float(np.median(np.abs(np.diff(recent))))
        if after.min() - recent[-1] > max(0.3, 5 * noise):
            ev = f"{_fmt(recent[-1])} → {_fmt(after[0])}, stays ≥ {_fmt(after.min())}"
            msg = "loss jumped and stayed up without any NaN (a silent death)"
            out.append(_finding(steps["step"].iloc[i], MODEL, "loss", "loss jump", ev, msg, 1))
            break
    g = steps[steps["grad_norm"].notna()]
    gn = g["grad_norm"].to_numpy(dtype=float)
    for i in range(window, len(gn)):
        hi = np.nanmax(gn[i - window : i])
        if np.isfinite(hi) and hi > 0 and gn[i] < 1e-3 * hi:
            ev = f"total gradient norm {_fmt(hi)} → {_fmt(gn[i])}"
            out.append(
                _finding(g["step"].iloc[i], MODEL, "grad", "vanished", ev, "gradients vanished", 2)
            )
            break
    return out


def _stalled(m: pd.DataFrame) -> tuple[list[str], list[dict[str, Any]]]:
    """Parameters that never moved while their gradients were non-zero (and their rows)."""
    per = m[m["metric"].isin(["grad_norm", "update_norm", "stuck_frac"])]
    if not len(per):
        return [], []
    wide = per.pivot_table(index=["layer", "factor", "step"], columns="metric", values="value")
    names, rows = [], []
    for (layer, param), g in wide.groupby(level=[0, 1], sort=False):
        if "grad_norm" not in g or "update_norm" not in g:
            continue
        live = g[g["grad_norm"] > 0]
        if len(live) < 2:
            continue
        still = live["update_norm"] == 0
        if "stuck_frac" in live:
            still |= live["stuck_frac"] >= STALL_FRACTION
        if bool(still.all()):
            name = f"{param}" if layer == MODEL else f"{layer}.{param}"
            names.append(name)
            step = int(live.index.get_level_values("step")[0])
            ev = f"{len(live)} recorded steps with a gradient, none moved it"
            rows.append(
                _finding(step, layer, param, "stalled", ev, f"{param} never moved", 4, False)
            )
    return names, rows


def _rounding_findings(m: pd.DataFrame) -> list[dict[str, Any]]:
    """16-bit parameters that lost most of their intended update to rounding (median)."""
    lost = m[m["metric"] == "update_lost"]
    out = []
    for (layer, param), g in lost.groupby(["layer", "factor"], sort=False):
        med = float(g["value"].median())
        if med > 0.5:
            ev = f"median {100 * med:.0f} % of the intended update lost"
            msg = f"{param}: most of each update is lost to rounding"
            out.append(_finding(g["step"].iloc[0], layer, param, "rounding", ev, msg, 4, False))
    return out


def _guard_findings(m: pd.DataFrame) -> list[dict[str, Any]]:
    """Each factor whose update SINGD's guard shrank: at its first activation, with the count
    and the largest reach (the guard is a safety net: never the origin)."""
    reach = m[m["metric"] == "guard_reach"]
    if not len(reach):
        return []
    limits = m[m["metric"] == "guard"].drop_duplicates(["step", "layer", "factor"])
    limits = limits.set_index(["step", "layer", "factor"])["value"]
    out = []
    for (layer, factor), g in reach.groupby(["layer", "factor"], sort=False):
        first = g.iloc[0]
        limit = limits.get((first["step"], layer, factor))
        bound = f" > {_fmt(limit)}" if limit is not None and math.isfinite(limit) else ""
        msg = f"guard shrank lr_cov for factor {factor} (reach {_fmt(first['value'])}{bound})"
        ev = f"{len(g)} activation(s), largest reach {_fmt(g['value'].max())}"
        out.append(_finding(first["step"], layer, factor, "guard", ev, msg, 3, False))
    return out
