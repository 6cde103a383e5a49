"""First-order rules as plain functions: Adam directions and compensated parameter updates.

Used for the parameters no Kronecker factor preconditions (the ``fallback``), and, with
``compensated=True``, for every parameter update in 16-bit floats.

* :func:`adam_directions_`: advance Adam's moment estimates and return the bias-corrected
  direction ``m_hat / (sqrt(v_hat) + eps)``; the caller adds decoupled weight decay and
  scales by the learning rate, as AdamW does.
* :func:`add_`: ``p += alpha * u`` for many tensors at once, either plainly or with Kahan
  compensation. A bfloat16 parameter near 1.0 has an ulp of 2^-7; a plain update smaller than
  half of it rounds back to the old value and is lost. With compensation the rounding error
  of each addition is kept in a buffer of the parameter's dtype and added back on the next
  step, so small updates accumulate as they would in float32 (to within one ulp).

The functions work on lists, foreach where torch allows, and update their tensor arguments
in place where the docstring says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Floating dtypes whose parameters profit from compensation (updates below half an ulp vanish).
LOW_PRECISION: frozenset[torch.dtype] = frozenset({torch.bfloat16, torch.float16})


def adam_directions_(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: int,
    betas: tuple[float, float],
    eps: float,
) -> list[Tensor]:
    """Update Adam's moments in place with ``grads`` and return ``m_hat / (sqrt(v_hat) + eps)``.

    ``step`` counts from 1 (the bias corrections of step ``t`` are ``1 - beta^t``). The moments
    keep their own dtype (float32 for 16-bit parameters, see :func:`moment_dtype`); gradients
    are cast to it. The returned directions are new tensors in the moments' dtype.
    """
    if not grads:
        return []
    beta1, beta2 = betas
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(list(exp_avgs), grads, 1.0 - beta1)
    torch._foreach_mul_(list(exp_avg_sqs), beta2)
    torch._foreach_addcmul_(list(exp_avg_sqs), grads, grads, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = 1.0 - beta2**step
    denom = torch._foreach_sqrt(list(exp_avg_sqs))
    torch._foreach_div_(denom, correction2**0.5)
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(list(exp_avgs), denom)
    torch._foreach_div_(directions, correction1)
    return directions


def moment_dtype(param: Tensor) -> torch.dtype:
    """The dtype of Adam's moments for ``param``: float32 for 16-bit parameters, else its own."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def add_(
    params: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    alpha: float,
    compensations: Sequence[Tensor | None] | None = None,
) -> None:
    """``p += alpha * u`` in place for each pair; Kahan-compensated where a buffer is given.

    ``compensations[i]`` (same shape and dtype as ``params[i]``, zero at start) holds the part
    of earlier updates that rounding dropped; it is added to this update and replaced by
    this addition's rounding error. The sum is formed in float32, so the error is exact for
    16-bit parameters. ``None`` entries (or no list) update plainly.
    """
    if not params:
        return
    if compensations is None:
        compensations = [None] * len(params)
    plain = [i for i, c in enumerate(compensations) if c is None]
    if plain:
        targets = [params[i] for i in plain]
        steps = [updates[i].to(params[i].dtype) for i in plain]
        torch._foreach_add_(targets, steps, alpha=alpha)
    for i, comp in enumerate(compensations):
        if comp is None:
            continue
        p = params[i]
        wide = p.float()
        intended = wide + (updates[i].float() * alpha + comp.float())
        p.copy_(intended)
        comp.copy_(intended - p.float())
