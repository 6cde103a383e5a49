"""What every view shares: layer labels, component colours, log axes, preconditioning factors.

One label function (`layer_labels`) names layers in every figure and the dashboard, one colour
mapping (`component_colours`) colours optimizer-state components the same way everywhere, and
`LOG_AXIS` gives every logarithmic axis the same tick style (``10^k``).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from plotly.colors import qualitative

from diagnostics.record.recording import Recording

#: Tick style of every logarithmic axis: powers of ten written as 10^k, never 1T / 1B / 1M.
LOG_AXIS: dict[str, Any] = {"type": "log", "exponentformat": "power", "showexponent": "all"}

#: Fixed colours of the optimizer-state components the optimizers of this project keep.
COMPONENT_COLOURS: dict[str, str] = {
    "K": "#1f77b4",
    "C": "#ff7f0e",
    "m_K": "#aec7e8",
    "m_C": "#ffbb78",
    "A": "#2ca02c",
    "G": "#d62728",
    "A_inv": "#98df8a",
    "G_inv": "#ff9896",
    "A_upcast": "#17becf",
    "G_upcast": "#bcbd22",
    "momentum": "#9467bd",
    "momentum_buffer": "#c5b0d5",
    "exp_avg": "#8c564b",
    "exp_avg_sq": "#e377c2",
    "max_exp_avg_sq": "#c49c94",
    "step": "#7f7f7f",
}
#: Colours handed to components not in `COMPONENT_COLOURS` (never one of those).
_EXTRA_COLOURS = [
    c
    for c in dict.fromkeys(c.lower() for c in qualitative.Dark24 + qualitative.Light24)
    if c not in {v.lower() for v in COMPONENT_COLOURS.values()}
]

#: Factors on the input side of a layer (``W`` is preconditioned as C C^T G K K^T or G^-1 G A^-1).
_INPUT_SIDE = ("K", "A")
_OUTPUT_SIDE = ("C", "G")


def component_colours(names: Iterable[str]) -> dict[str, str]:
    """A distinct colour per component name: the fixed `COMPONENT_COLOURS` entry where there is
    one, else a colour chosen from the name's CRC (the same name gets the same colour whenever
    the set of names is the same), never one already taken in this set."""
    names = list(dict.fromkeys(str(n) for n in names))
    out = {n: COMPONENT_COLOURS[n] for n in names if n in COMPONENT_COLOURS}
    used = set(out.values())
    for name in sorted(n for n in names if n not in out):
        start = zlib.crc32(name.encode()) % len(_EXTRA_COLOURS)
        for k in range(len(_EXTRA_COLOURS)):
            colour = _EXTRA_COLOURS[(start + k) % len(_EXTRA_COLOURS)]
            if colour not in used:
                break
        else:  # more unknown names than colours: reuse, still deterministic
            colour = _EXTRA_COLOURS[start]
        out[name] = colour
        used.add(colour)
    return {n: out[n] for n in names}


def is_preconditioning(factor: str) -> bool:
    """Whether a factor name is a Kronecker factor that preconditions (K, C, A, G, ...), not an
    optimizer moment (``weight.exp_avg_sq``, ``m_K``) nor a stored inverse (``A_inv``)."""
    return "." not in factor and not factor.startswith("m_") and not factor.endswith("_inv")


def preconditioning_factors(recording: Recording) -> list[tuple[str, str]]:
    """``(layer, factor)`` pairs whose spectrum is recorded (an ``eig_min`` metric or spectra
    rows) and that precondition (`is_preconditioning`), in first-seen order."""
    m = recording.metrics
    pairs = m.loc[m["metric"].isin(("eig_min", "sv_min")), ["layer", "factor"]]
    sp = recording.spectra[["layer", "factor"]]
    seen = list(dict.fromkeys(map(tuple, pairs.itertuples(index=False, name=None))))
    seen += [p for p in dict.fromkeys(sp.itertuples(index=False, name=None)) if p not in seen]
    return [(str(ly), str(fa)) for ly, fa in seen if is_preconditioning(str(fa))]


def added_damping(recording: Recording, factor: str, layer: str | None = None) -> float | None:
    """The damping ``lambda`` the optimizer adds to ``factor`` before inverting it (KFAC inverts
    ``A + lambda I`` and ``G + lambda I``), else None (SINGD's damping acts inside its update of
    K and C, so K K^T is already the preconditioner). The layer's recorded ``damping`` wins
    over the run's hyper-parameters."""
    if factor not in ("A", "G"):
        return None
    m = recording.metrics
    rows = m[(m["factor"] == "(optimizer)") & (m["metric"] == "damping")]
    if layer is not None and len(rows):
        mine = rows.loc[rows["layer"] == layer, "value"]
        if len(mine) and math.isfinite(mine.iloc[-1]) and mine.iloc[-1] > 0:
            return float(mine.iloc[-1])
    meta = recording.meta
    groups = meta.get("hyperparameters") or []
    kfac = str(meta.get("optimizer", "")).upper().startswith("KFAC") or any(
        isinstance(g, Mapping) and "inverse_method" in g for g in groups
    )
    if not kfac:
        return None
    for source in [*groups, meta.get("config") or {}]:
        value = source.get("damping") if isinstance(source, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def layer_labels(recording: Recording) -> dict[str, str]:
    """``{layer: "1 · Linear 64→128"}``: each recorded layer's qualified name and kind.

    The kind comes from ``recording.meta["layers"]`` (a mapping of names to kinds or to
    mappings with ``kind``, or a list of mappings with ``name`` and ``kind``) or from the
    ``kind`` column of the events and errors; a recording without kinds is labelled by the
    sizes of its factors (``1 · 65→128``: the input side counts a bias column).
    """
    kinds = _given_kinds(recording)
    sizes = _factor_sizes(recording)
    out = {}
    for layer in _layer_names(recording):
        what = kinds.get(layer) or sizes.get(layer, "")
        out[layer] = f"{layer} · {what}" if what else layer
    return out


def layer_label(recording: Recording, layer: str) -> str:
    """One layer's label (see `layer_labels`)."""
    return layer_labels(recording).get(str(layer), str(layer))


def _given_kinds(recording: Recording) -> dict[str, str]:
    """``{layer: kind}`` from what the recording says about its layers."""
    kinds: dict[str, str] = {}
    given = recording.meta.get("layers")
    if isinstance(given, Mapping):
        kinds = {str(k): _describe(v) for k, v in given.items()}
    elif isinstance(given, (list, tuple)):
        for entry in given:
            if isinstance(entry, Mapping):
                name = entry.get("name", entry.get("layer"))
                if name is not None:
                    kinds[str(name)] = _describe(entry)
    for frame in (recording.events, getattr(recording, "errors", None)):
        if frame is not None and "kind" in frame and len(frame):
            for layer, kind in zip(frame["layer"].astype(str), frame["kind"].astype(str)):
                if kind and not kinds.get(layer):
                    kinds[layer] = kind
    return {k: v for k, v in kinds.items() if v}


def _layer_names(recording: Recording) -> list[str]:
    """Every layer named in the recording's metrics, spectra, memory and events."""
    names: list[str] = []
    for frame in (recording.metrics, recording.spectra, recording.memory, recording.events):
        if "layer" in frame:
            names += [str(x) for x in frame["layer"].unique()]
    return list(dict.fromkeys(names))


def _describe(entry: Any) -> str:
    """``"Linear 64→128"`` from a ``meta["layers"]`` entry (a string or a mapping)."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, Mapping):
        return ""
    kind = str(entry.get("kind") or entry.get("module_type") or "")
    if "→" in kind or "×" in kind:  # the kind already says its sizes
        return kind
    din = entry.get("in_features", entry.get("in"))
    dout = entry.get("out_features", entry.get("out"))
    shape = f"{din}→{dout}" if din is not None and dout is not None else ""
    return " ".join(p for p in (kind, shape) if p)


def _factor_sizes(recording: Recording) -> dict[str, str]:
    """``{layer: "65→128"}`` from the number of recorded eigenvalues of each side's factor."""
    sp = recording.spectra
    if len(sp) == 0:
        return {}
    first = sp[sp["step"] == sp.groupby(["layer", "factor"])["step"].transform("min")]
    dims = first.groupby(["layer", "factor"])["index"].max() + 1
    out = {}
    for layer in dict.fromkeys(str(x) for x in first["layer"]):
        din = next((int(dims[(layer, f)]) for f in _INPUT_SIDE if (layer, f) in dims), None)
        dout = next((int(dims[(layer, f)]) for f in _OUTPUT_SIDE if (layer, f) in dims), None)
        if din is not None and dout is not None:
            out[layer] = f"{din}→{dout}"
    return out


_FAILED_FACTOR = re.compile(r"factor (\w+) of layer '([^']+)'")


def first_failure(recording: Recording) -> tuple[int, str, str | None] | None:
    """``(step, layer, factor or None)`` of the earliest NaN/Inf event or error; a layer and
    factor named in an error's message (``factor A of layer '1'``) win over ``(model)``."""
    rows = []
    for frame in (recording.events, getattr(recording, "errors", None)):
        if frame is not None and len(frame):
            first = frame.sort_values("step", kind="stable").iloc[0]
            rows.append((int(first["step"]), str(first["layer"]), str(first.get("message", ""))))
    if not rows:
        return None
    step, layer, message = min(rows, key=lambda r: r[0])
    match = _FAILED_FACTOR.search(message)
    if match:
        return step, match.group(2), match.group(1)
    return step, layer, None


def damped_condition(recording: Recording) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``{(layer, factor): [(step, cond), ...]}`` of every preconditioning factor: the condition
    number of the matrix the optimizer uses (``A + λI`` where it adds damping, see
    `added_damping`: the recorded ``cond_damped``, else computed from ``eig_min`` and
    ``eig_max``), inf where that matrix is not positive definite."""
    m = recording.metrics
    m = m[m["metric"].isin(("cond", "cond_damped", "eig_min", "eig_max"))]
    parts = {k: g.sort_values("step") for k, g in m.groupby(["layer", "factor", "metric"])}
    out = {}
    for layer, factor in preconditioning_factors(recording):
        lam = added_damping(recording, factor, layer)
        lo, hi = parts.get((layer, factor, "eig_min")), parts.get((layer, factor, "eig_max"))
        recorded = parts.get((layer, factor, "cond_damped"))
        if lam is not None and recorded is not None:
            out[(layer, factor)] = list(zip(recorded["step"].tolist(), recorded["value"].tolist()))
        elif lam is not None and lo is not None and hi is not None:
            pairs = zip(lo["step"].tolist(), lo["value"].tolist(), hi["value"].tolist())
            out[(layer, factor)] = [
                (s, (b + lam) / (a + lam) if a + lam > 0 else math.inf) for s, a, b in pairs
            ]
        elif (layer, factor, "cond") in parts:
            c = parts[(layer, factor, "cond")]
            out[(layer, factor)] = list(zip(c["step"].tolist(), c["value"].tolist()))
    return out


def worst_conditioned(recording: Recording) -> tuple[str, str, float] | None:
    """``(layer, factor, cond)`` of the preconditioning factor with the largest finite condition
    number at any recorded step (`damped_condition`); None without one."""
    best = None
    for (layer, factor), series in damped_condition(recording).items():
        finite = [c for _, c in series if math.isfinite(c)]
        if finite and (best is None or max(finite) > best[2]):
            best = (layer, factor, max(finite))
    return best


def log_range_decades(values: Iterable[float]) -> float:
    """How many decades the positive finite ``values`` span (0 when fewer than two)."""
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if len(pos) < 2:
        return 0.0
    return math.log10(max(pos) / min(pos))


__all__ = [
    "COMPONENT_COLOURS",
    "LOG_AXIS",
    "added_damping",
    "component_colours",
    "damped_condition",
    "first_failure",
    "is_preconditioning",
    "layer_label",
    "layer_labels",
    "log_range_decades",
    "preconditioning_factors",
    "worst_conditioned",
]
