"""`OptimizerState`: the generic ``optimizer.state`` of optimizers without factors (AdamW & co)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from diagnostics.record import metrics as M
from diagnostics.record.quantities.base import MetricRow, Params, Probe, Tables

#: State keys that hold a second-moment estimate (the diagonal preconditioner Adam-type
#: optimizers divide by).
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf")


class StateItem(NamedTuple):
    """One state tensor of one parameter, with the group's ``eps``."""

    layer: str
    short: str
    key: str
    tensor: torch.Tensor
    eps: float

    @property
    def name(self) -> str:
        """Its name in the recording: ``"<parameter>.<key>"``, e.g. ``"weight.exp_avg_sq"``."""
        return f"{self.short}.{self.key}"


class OptimizerState:
    """Norms of each state tensor (phase ``preconditioner update`` in events) and, with
    spectra, min/max/mean/condition of second moments. Read through the public
    ``optimizer.state``, only for optimizers without ``preconditioner_factors()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Params, has_factors: bool):
        self.optimizer = optimizer
        self.params = params
        self.active = not has_factors

    def items(self) -> list[StateItem]:
        """The floating-point state tensors (none for optimizers with factors)."""
        out: list[StateItem] = []
        if not self.active:
            return out
        state = self.optimizer.state
        for group in self.optimizer.param_groups:
            eps = group.get("eps", 0.0)
            eps = float(eps) if isinstance(eps, (int, float)) else 0.0
            for p in group["params"]:
                st = state.get(p)
                if not st:
                    continue
                layer, short = self.params.names[self.params.index[id(p)]]
                for key, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.is_floating_point():
                        out.append(StateItem(layer, short, str(key), v, eps))
        return out

    def probes(self, items: list[StateItem]) -> list[Probe]:
        """One probe per state tensor."""
        return [Probe("preconditioner update", it.layer, it.name, it.tensor) for it in items]

    def record_norms(self, step: int, probes: list[Probe], norms: list[float], tables: Tables):
        """A ``norm`` row per state tensor."""
        for probe, n in zip(probes, norms):
            tables.metrics.append(MetricRow(step, probe.layer, probe.name, "norm", n))

    def record_moments(self, step: int, items: list[StateItem], tables: Tables) -> None:
        """``min``, ``max``, ``mean``, ``cond`` rows of each second-moment estimate."""
        moments = [it for it in items if it.key in SECOND_MOMENT_KEYS]
        summaries = M.second_moment_summaries([(it.tensor, it.eps) for it in moments])
        for it, summary in zip(moments, summaries):
            for metric, v in summary.items():
                tables.metrics.append(MetricRow(step, it.layer, it.name, metric, v))
