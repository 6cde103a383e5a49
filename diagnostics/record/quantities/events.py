"""`Events`: NaN/Inf events (one row per phase, layer and tensor, in the order they
happened) and recorded errors (rows of their own table); `GuardLog`: the activations of
SINGD's factor-update guard as metric rows."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from diagnostics.record import metrics as M
from diagnostics.record.quantities.base import (
    MODEL,
    Finding,
    LayerIndex,
    MetricRow,
    Params,
    Probe,
    StepContext,
    Tables,
)

_RANK = {"forward": 0, "backward": 2, "preconditioner update": 3, "parameter update": 4}


class Events:
    """Finds NaN/Inf in the probed and hooked tensors and turns them into event rows.

    A probe whose norm is non-finite is counted in detail (`metrics.count_vector`); the
    counts of all such tensors are read with one host sync. Several tensors of one
    (phase, layer, name) merge into one event. Events are added in the order they happened
    (`when`). After ``max_events`` rows, further events are dropped with one warning;
    errors (`error`) go to their own table and are always kept.
    """

    def __init__(
        self,
        params: Params,
        check_finite: str | bool,
        max_events: int,
        index: LayerIndex | None = None,
    ) -> None:
        self.params = params
        self.check_finite = check_finite
        self.max_events = max_events
        self.index = index if index is not None else LayerIndex(None)
        self._warned = False
        self._order = 0

    def when(self, f: Finding, seen: int) -> tuple:
        """Sort key of a finding within its step: forward activations in forward order, the
        loss, backward from the last layer to the first (a layer's output gradient before
        its parameters' gradients), factors and state, then parameters; ``seen``: the
        finding's place in the list (the hooks' own order breaks ties)."""
        pos = self.index.position(f.layer)
        if f.phase == "forward" and f.layer == MODEL and f.name == "loss":
            return (1, (0, 0), 0, seen)
        if f.phase == "backward":
            own_grad = 0 if f.name.startswith("grad_") else 1
            return (2, (-pos[0], -pos[1]), own_grad, seen)
        return (_RANK.get(f.phase, 5), pos, 0, seen)

    def loss_probes(self, loss: Any) -> list[Probe]:
        """The loss as a probe (phase ``forward``), when it is a tensor or non-finite."""
        if isinstance(loss, torch.Tensor):
            return [Probe("forward", MODEL, "loss", loss)]
        if loss is not None and not math.isfinite(loss):
            return [Probe("forward", MODEL, "loss", torch.tensor(loss, dtype=torch.float64))]
        return []

    def cheap_check(self, loss: Any) -> bool:
        """Finiteness of the loss (and, for ``"grads"``, all gradients): one host sync."""
        if self.check_finite == "grads":
            grads = [p.grad for p in self.params.tensors if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                if self.params.cpu:
                    total = sum(float(n) for n in norms)
                else:
                    total = torch.stack([n.float() for n in norms]).sum()
                    if isinstance(loss, torch.Tensor):
                        total = total + loss.float()
                        return bool(torch.isfinite(total))
                    total = float(total)
                if not math.isfinite(total):
                    return False
        return loss is None or math.isfinite(float(loss))

    def inspect(
        self,
        ctx: StepContext,
        probes: list[Probe],
        norms: list[float],
        hooked: list[Finding],
        tables: Tables,
    ) -> None:
        """Add the events of one step: probes with a non-finite norm, then hooked findings."""
        found = [
            Finding(p.phase, p.layer, p.name, p.tensor, M.count_vector(p.tensor))
            for p, n in zip(probes, norms)
            if not math.isfinite(n)
        ]
        found.extend(hooked)
        if not found:
            return
        order = sorted(range(len(found)), key=lambda i: self.when(found[i], i))
        found = [found[i] for i in order]
        counts = torch.stack([f.counts.to("cpu") for f in found]).tolist()
        merged: dict[tuple[str, str, str], dict[str, Any]] = {}
        for f, (nan, pos, neg, absmax) in zip(found, counts):
            if nan + pos + neg == 0:
                continue  # a norm overflowed, the tensor itself is finite
            ev = merged.get((f.phase, f.layer, f.name))
            if ev is None:
                merged[(f.phase, f.layer, f.name)] = {
                    "step": ctx.step,
                    "order": -1,
                    "phase": f.phase,
                    "layer": f.layer,
                    "kind": self.index.kind(f.layer),
                    "tensor": f.name,
                    "dtype": str(f.tensor.dtype).removeprefix("torch."),
                    "shape": str(tuple(f.tensor.shape)),
                    "numel": f.tensor.numel(),
                    "n_nan": int(nan),
                    "n_posinf": int(pos),
                    "n_neginf": int(neg),
                    "finite_absmax": float(absmax),
                    "grad_scale": ctx.grad_scale,
                    "skipped": ctx.skipped,
                }
            else:
                ev["n_nan"] += int(nan)
                ev["n_posinf"] += int(pos)
                ev["n_neginf"] += int(neg)
                ev["numel"] += f.tensor.numel()
                ev["finite_absmax"] = max(ev["finite_absmax"], float(absmax))
        self._add(list(merged.values()), tables)

    def _add(self, new: list[dict[str, Any]], tables: Tables) -> None:
        """Append events up to ``max_events`` (warning once when some are dropped)."""
        room = self.max_events - len(tables.events)
        if len(new) > room:
            if not self._warned:
                warnings.warn(
                    f"Recorder: more than max_events={self.max_events} NaN/Inf events; "
                    "further events are dropped",
                    RuntimeWarning,
                    stacklevel=5,
                )
                self._warned = True
            new = new[: max(room, 0)]
        for ev in new:
            ev["order"] = self._order
            self._order += 1
        tables.events.extend(new)

    def error(
        self,
        step: int,
        phase: str,
        layer: str,
        tensor: str,
        exception: str,
        message: str,
        grad_scale: float,
    ) -> dict[str, Any]:
        """The row of ``recording.errors`` for an error that ended or disturbed training."""
        return {
            "step": step,
            "phase": phase,
            "layer": layer,
            "kind": self.index.kind(layer),
            "tensor": tensor,
            "exception": exception,
            "message": message,
            "grad_scale": grad_scale,
        }


#: Metric names of a guard activation: how far the factor update would have reached, and
#: the group's ``guard`` it was shrunk to.
GUARD_REACH, GUARD_LIMIT = "guard_reach", "guard"


class GuardLog:
    """Turns new entries of ``optimizer.guard_activations()`` into rows of ``metrics``.

    Each activation ``(step, layer, factor, reach)`` (the guard shrank lr_cov so that the
    update of ``factor`` reaches at most the group's ``guard``) becomes a ``guard_reach``
    row and, when the group has a numeric ``guard``, a ``guard`` row at the same step,
    layer and factor. Steps are counted from the recorder's first step. Optimizers without
    ``guard_activations`` record nothing.
    """

    def __init__(self, optimizer: Any, limit: Callable[[str], float]) -> None:
        self._read = getattr(optimizer, "guard_activations", None)
        start = getattr(optimizer, "steps", 0)
        self._start = start if isinstance(start, int) and not isinstance(start, bool) else 0
        self._limit = limit
        self._seen = 0

    @property
    def active(self) -> bool:
        """Whether the optimizer logs guard activations."""
        return callable(self._read)

    def record(self, tables: Tables) -> int:
        """Append the activations logged since the last call; how many were new."""
        if not self.active:
            return 0
        log = self._read()
        new = log[self._seen :]
        self._seen = len(log)
        for a in new:
            step, layer, factor, reach = a
            step = max(int(step) - self._start, 0)
            layer, factor = str(layer), str(factor)
            tables.metrics.append(MetricRow(step, layer, factor, GUARD_REACH, float(reach)))
            limit = self._limit(layer)
            if math.isfinite(limit):
                tables.metrics.append(MetricRow(step, layer, factor, GUARD_LIMIT, limit))
        return len(new)
