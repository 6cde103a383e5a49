"""`Rounding`: how much of each 16-bit parameter's update survives rounding.

Two per-parameter metrics on recorded steps, for parameters stored in bfloat16/float16:

- ``stuck_frac``: the fraction of the elements with a non-zero gradient whose value did
  not change at all in this step (any optimizer; 1.0 means the parameter stalled: every
  update was below half an ulp of the value, e.g. a bf16 norm weight near 1.0, whose ulp
  is 2^-7, under an Adam step of 1e-3);
- ``update_lost``: ``max(0, 1 - |actual change| / |intended update|)`` (Frobenius norms),
  where the intended update is what the optimizer meant to add, rebuilt in float32 from
  its public state after the step: for ``torch.optim.Adam``/``AdamW``
  ``lr * m_hat / (sqrt(v_hat) + eps)`` (plus ``lr * weight_decay * p`` when decoupled),
  for ``torch.optim.SGD`` ``lr * d`` (``d`` the momentum buffer, or the gradient plus
  weight decay without momentum). Other optimizers (SINGD, KFAC, ...) get ``stuck_frac``
  only: their direction is not in their state.

Both are reductions over copies in float32; nothing of the training is written.
"""

from __future__ import annotations

import math

import torch

from diagnostics.record.quantities.base import LOW_PRECISION, MetricRow, Params, Tables

#: A parameter counts as stalled on a step when at least this fraction of its elements with
#: a non-zero gradient did not move.
STALL_FRACTION = 0.99


def _intended(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor, before: torch.Tensor):
    """The float32 update the optimizer meant to make to ``p`` (``before``: p before the
    step, float32), or None where it cannot be rebuilt from the state."""
    st = optimizer.state.get(p, {})
    lr = group.get("lr")
    if not isinstance(lr, (int, float)):
        return None
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and "exp_avg" in st:
        b1, b2 = group["betas"]
        t = float(st["step"])
        m = st["exp_avg"].float() / (1 - b1**t)
        v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
        d = lr * m / (v.float().div(1 - b2**t).sqrt() + group["eps"])
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
            "decoupled_weight_decay", False
        )
        if decoupled and group.get("weight_decay"):
            d = d + lr * group["weight_decay"] * before
        return d
    if isinstance(optimizer, torch.optim.SGD) and p.grad is not None:
        buf = st.get("momentum_buffer")
        g = p.grad.float()
        if group.get("weight_decay"):
            g = g + group["weight_decay"] * before
        if buf is None:
            return lr * g
        return lr * (g + group["momentum"] * buf.float() if group.get("nesterov") else buf.float())
    return None


class Rounding:
    """``stuck_frac`` and ``update_lost`` rows of the 16-bit parameters (see module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Params) -> None:
        self.optimizer = optimizer
        self.params = params
        self._group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.active = any(t.dtype in LOW_PRECISION for t in params.tensors)

    @torch.no_grad()
    def record(self, step: int, minus_updates: list[torch.Tensor], tables: Tables) -> None:
        """Add the rows of one recorded step (``minus_updates``: before - after per parameter)."""
        if not self.active or len(minus_updates) != len(self.params.tensors):
            return
        rows, out = [], []
        for t, (layer, short), mu in zip(self.params.tensors, self.params.names, minus_updates):
            if t.dtype not in LOW_PRECISION or t.grad is None:
                continue
            delta = mu.reshape(t.shape).float()
            moving = t.grad != 0
            stuck = (moving & (delta == 0)).sum()
            vals = [moving.sum(), stuck]
            before = t.detach().float() + delta
            intended = _intended(self.optimizer, self._group[id(t)], t, before)
            if intended is not None:
                vals += [delta.norm(), intended.norm()]
            out.append(((layer, short), torch.stack([v.double() for v in vals])))
        values = [v.tolist() for _, v in out]  # one read per parameter on the CPU
        for ((layer, short), _), v in zip(out, values):
            n_moving, n_stuck = v[0], v[1]
            frac = n_stuck / n_moving if n_moving else math.nan
            rows.append(MetricRow(step, layer, short, "stuck_frac", frac))
            if len(v) == 4:
                lost = max(0.0, 1.0 - v[2] / v[3]) if v[3] > 0 else math.nan
                rows.append(MetricRow(step, layer, short, "update_lost", lost))
        tables.metrics.extend(rows)
