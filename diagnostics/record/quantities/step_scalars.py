"""`StepScalars`: loss, learning rate, step time; gradient, parameter and update norms."""

from __future__ import annotations

import math
from typing import Any

import torch

from diagnostics.record.quantities.base import MetricRow, Params, Probe, StepContext, Tables
from diagnostics.record.recording import COLUMNS


def loss_value(loss: torch.Tensor | float | None) -> Any:
    """The loss as it is kept: a float on the CPU, a detached 0-d tensor elsewhere (no
    host sync), or None (no loss given: NaN in the frame, but not a NaN event)."""
    if isinstance(loss, torch.Tensor):
        if loss.is_cpu:  # on the CPU a float costs nothing
            try:
                value: Any = loss.item()
            except RuntimeError:
                value = None
                if loss.numel() == 1:
                    raise
        else:  # elsewhere keep the tensor (no host sync)
            value = loss.detach() if loss.numel() == 1 else None
        if value is None:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return value
    if loss is None:
        return None
    if isinstance(loss, (int, float)):
        return float(loss)
    raise TypeError(f"loss must be a scalar tensor, a float or None, not {type(loss)}")


class StepScalars:
    """The per-step scalars: the row of ``recording.steps`` every step gets, and on
    recorded steps the norms of gradients, parameters and updates (per layer in
    ``metrics``, totals in ``steps``) and each parameter group's learning rate.

    The update is the difference of the parameters before and after ``optimizer.step()``:
    `snapshot` copies them (into buffers kept from step to step) from the optimizer's step
    pre-hook. On unrecorded steps `totals` gives the total gradient and update norms.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Params) -> None:
        self.optimizer = optimizer
        self.params = params
        self._grad_names = [short + ".grad" for _, short in params.names]
        self._before: list[torch.Tensor] | None = None
        self._buffers: list[torch.Tensor] | None = None

    def row(
        self, step: int, loss: Any, step_time: float, skipped: bool, recorded: bool, extra: dict
    ) -> dict[str, Any]:
        """The step's row of ``recording.steps`` (norms are added on recorded steps)."""
        row: dict[str, Any] = {
            "step": step,
            "recorded": recorded,
            "loss": loss,
            "lr": float(self.optimizer.param_groups[0].get("lr", math.nan)),
            "step_time_s": step_time,
            "skipped": skipped,
        }
        for key, v in extra.items():
            if key in COLUMNS["steps"]:
                raise ValueError(f"step: {key!r} is a built-in column; use another name")
            row[key] = float(v)
        return row

    def probes(self, parameters: bool = True) -> list[Probe]:
        """Gradients (phase ``backward``) and, with ``parameters``, the parameters."""
        p = self.params
        out = [
            Probe("backward", layer, gname, t.grad)
            for t, (layer, _), gname in zip(p.tensors, p.names, self._grad_names)
            if t.grad is not None and t.grad.is_floating_point()
        ]
        if parameters:
            out += [
                Probe("parameter update", layer, short, t)
                for t, (layer, short) in zip(p.tensors, p.names)
                if t.is_floating_point()
            ]
        return out

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the parameters before ``optimizer.step()`` (for the update norm)."""
        p = self.params
        bufs = self._buffers
        if bufs is None or any(b.device != t.device for b, t in zip(bufs, p.tensors)):
            if p.flat:  # one copy of all parameters instead of one per tensor
                bufs = [
                    torch.empty(sum(p.sizes), dtype=p.tensors[0].dtype, device=p.tensors[0].device)
                ]
            else:
                bufs = [torch.empty_like(t) for t in p.tensors]
            self._buffers = bufs
        if p.flat:
            torch.cat([t.detach().reshape(-1) for t in p.tensors], out=bufs[0])
        elif bufs:
            torch._foreach_copy_(bufs, [t.detach() for t in p.tensors])
        self._before = bufs

    @torch.no_grad()
    def totals(self, skipped: bool) -> tuple[Any, Any]:
        """Total gradient and update norms of an unrecorded step: floats on the CPU, 0-d
        tensors elsewhere (read when the recording is built: no host sync now)."""
        grads = [t.grad for t in self.params.tensors if t.grad is not None]
        grads = [g for g in grads if g.is_floating_point()]
        updates = self.update_tensors()
        out: list[Any] = []
        for ts in (grads, updates):
            if not ts:
                out.append(0.0 if skipped and ts is updates else math.nan)
                continue
            norms = torch._foreach_norm(ts)
            total = torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]))
            out.append(float(total) if self.params.cpu else total)
        return out[0], out[1]

    def forget(self) -> None:
        """Drop the snapshot (end of a step)."""
        self._before = None

    @torch.no_grad()
    def update_tensors(self) -> list[torch.Tensor]:
        """Minus the update of each parameter (in the snapshot's storage), or [] without one."""
        before, p = self._before, self.params
        if before is not None and len(before) == 1 and p.flat:
            views = list(before[0].split(p.sizes))  # one view per parameter, no copy
            torch._foreach_sub_(views, [t.detach().reshape(-1) for t in p.tensors])
            return views
        if before is not None and len(before) == len(p.tensors):
            torch._foreach_sub_(before, p.tensors)  # before <- before - after = -update
            return before
        return []

    def record(
        self,
        ctx: StepContext,
        probes: list[Probe],
        norms: list[float],
        update_norms: list[float],
        tables: Tables,
    ) -> None:
        """Per-layer and total norms of gradients, parameters and updates; per parameter
        (factor = its short name, e.g. ``weight``) ``grad_norm`` and ``update_norm``;
        learning rates."""
        sq: dict[str, dict[str, float]] = {"grad": {}, "param": {}, "update": {}}
        kinds = {"backward": sq["grad"], "parameter update": sq["param"]}
        for probe, n in zip(probes, norms):
            d = kinds[probe.phase]
            d[probe.layer] = d.get(probe.layer, 0.0) + n * n
        for (layer, _), n in zip(self.params.names, update_norms):
            sq["update"][layer] = sq["update"].get(layer, 0.0) + n * n
        s, rows = ctx.step, tables.metrics
        for probe, n in zip(probes, norms):  # per parameter: what `diagnose` needs for stalls
            if probe.phase == "backward":
                rows.append(MetricRow(s, probe.layer, probe.name[:-5], "grad_norm", n))
        for (layer, short), n in zip(self.params.names, update_norms):
            rows.append(MetricRow(s, layer, short, "update_norm", n))
        for kind, d in sq.items():
            for layer, v in d.items():
                rows.append(MetricRow(s, layer, kind, "norm", math.sqrt(v)))
        g2, p2, u2 = sq["grad"], sq["param"], sq["update"]
        row = ctx.row
        row["grad_norm"] = math.sqrt(sum(g2.values())) if g2 else math.nan
        row["param_norm"] = math.sqrt(sum(p2.values())) if p2 else math.nan
        no_update = 0.0 if ctx.skipped else math.nan
        row["update_norm"] = math.sqrt(sum(u2.values())) if u2 else no_update
        for i, g in enumerate(self.optimizer.param_groups):
            if "lr" in g:
                rows.append(MetricRow(s, f"group{i}", "optimizer", "lr", float(g["lr"])))
