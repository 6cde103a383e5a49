"""SINGD's statistics ``H_K = Pi(K^T a^T a K)`` and ``H_C = Pi(C^T g^T g C)`` of one layer,
from the rows :mod:`singd.capture` builds, summed over the backward passes before a step.

Each backward pass gives one :class:`Term` per side (:func:`input_term`, :func:`grad_term`),
which picks the cheapest exact route for the layer kind and factor: the column sums of
squares for diagonal factors (multiplied by the squared factor entries once, at the
update), a Conv2d input Gram without the patch matrix, fp32 accumulation of 16-bit terms
(rows normalised to max |g| = 1 before they meet fp16), or the structure's own
``from_inner``/``from_gram``. An :class:`Accumulator` sums the terms; :func:`finalize` turns
the two accumulators into the statistics of the preconditioner update. See
docs/architecture.md, 'singd: the optimizer'.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from singd.capture import (
    conv_input_gram,
    conv_row_count,
    grad_rows,
    grad_square_sums,
    input_rows,
    input_square_sums,
    loss_average_count,
)
from singd.structures import Diagonal, StructuredMatrix
from singd.update import gram_route, inner_statistic

#: Factor dtypes whose statistics are accumulated in their own dtype.
FULL_DTYPES = (torch.float32, torch.float64)


class Term(NamedTuple):
    """One backward pass's contribution ``weight * value`` to a statistic."""

    value: StructuredMatrix
    weight: float
    #: rows (K side: the divisor of the mean) or loss terms (C side: the n of loss_average)
    count: int
    #: ``value`` holds a diagonal factor's column sums of squares, not yet times ``f^2``
    square_sums: bool = False


class Accumulator:
    """A weighted sum ``coef * acc`` of statistics over backward passes, plus a row count.

    ``square_sums``: the terms are a diagonal factor's column sums of squares of the data,
    still to be multiplied by the squared factor entries (done once, at the update).
    """

    __slots__ = ("acc", "coef", "count", "square_sums")

    def __init__(self, square_sums: bool = False) -> None:
        self.acc: StructuredMatrix | None = None
        self.coef = 1.0
        self.count = 0
        self.square_sums = square_sums

    def add(self, term: StructuredMatrix, weight: float, count: int) -> None:
        """Add ``weight * term`` (``term`` is consumed) and ``count`` rows / loss terms."""
        if self.acc is None:
            self.acc, self.coef = term, weight
        else:
            self.acc.add_(term, alpha=weight / self.coef)
        self.count += count

    def value_and_scale(self, factor: float) -> tuple[StructuredMatrix, float]:
        """``(acc, s)`` with ``s * acc`` the statistic times ``factor`` (no copy, no op)."""
        return self.acc, factor * self.coef


def accumulate(acc: Accumulator | None, term: Term) -> Accumulator:
    """Add ``term`` to ``acc`` (a new accumulator when None) and return it."""
    if acc is None:
        acc = Accumulator(term.square_sums)
    acc.add(term.value, term.weight, term.count)
    return acc


def input_term(
    module: nn.Module, x: Tensor, grad_output: Tensor, K: StructuredMatrix, kfac_approx: str
) -> Term:
    """``Pi(K^T a^T a K)`` of one backward pass (the mean over its rows), by the cheapest
    route for the layer kind and K's structure and dtype."""
    expand = kfac_approx == "expand"
    if expand and type(K) is Diagonal and K.dtype in FULL_DTYPES:
        sq, rows = input_square_sums(module, x, K.dtype)
        return Term(Diagonal._wrap(K.dim, sq), 1.0, rows, True)
    if (
        expand
        and isinstance(module, nn.Conv2d)
        and K.dtype in FULL_DTYPES
        and gram_route(K)
        and conv_row_count(module, grad_output) > K.dim
    ):
        A, rows = conv_input_gram(module, x, K.dtype)
        return Term(K.from_gram(A), 1.0, rows)
    a = input_rows(module, x, kfac_approx)
    rows = a.shape[0]
    if K.dtype == torch.float16:  # mean of squares, accumulated in fp32
        a = (a.float() * (1.0 / math.sqrt(rows))).half()
        return Term(inner_statistic(K, a).to(dtype=torch.float32), float(rows), rows)
    a = a if a.dtype == K.dtype else a.to(K.dtype)
    return Term(inner_statistic(K, a), 1.0, rows)


def grad_term(
    module: nn.Module,
    grad_output: Tensor,
    C: StructuredMatrix,
    kfac_approx: str,
    loss_average: str | None,
) -> Term:
    """``Pi(C^T g^T g C)`` of one backward pass (a sum over its rows, still loss-scaled),
    by the cheapest route for C's structure and dtype."""
    n = loss_average_count(module, grad_output, loss_average)
    if kfac_approx == "expand" and type(C) is Diagonal and C.dtype in FULL_DTYPES:
        sq = grad_square_sums(module, grad_output, C.dtype)
        return Term(Diagonal._wrap(C.dim, sq), 1.0, n, True)
    g = grad_rows(module, grad_output, kfac_approx)
    if C.dtype == torch.float16:  # scaled to max |g| = 1 so nothing overflows
        g32 = g.float()
        peak = float(g32.abs().max()) if g32.numel() else 0.0
        peak = peak if math.isfinite(peak) and peak > 0 else 1.0
        g = (g32 * (1.0 / peak)).half()
        return Term(inner_statistic(C, g).to(dtype=torch.float32), peak * peak, n)
    g = g if g.dtype == C.dtype else g.to(C.dtype)
    return Term(inner_statistic(C, g), 1.0, n)


def materialize(S: StructuredMatrix, scale: float, dtype: torch.dtype) -> StructuredMatrix:
    """``scale * S`` in ``dtype`` (scaled in S's dtype first, which is fp32 for fp16 factors)."""
    if scale != 1.0:
        S = S.mul_(scale)
    return S if S.dtype == dtype else S.to(dtype=dtype)


class Statistics(NamedTuple):
    """A layer's finished statistics: ``scale_K * H_K`` and ``scale_C * H_C``."""

    H_K: StructuredMatrix
    H_C: StructuredMatrix
    scale_K: float
    scale_C: float
    #: H_K / H_C still hold column sums of squares (diagonal factors, see :class:`Term`)
    square_sums_K: bool
    square_sums_C: bool


def finalize(
    acc_K: Accumulator,
    acc_C: Accumulator,
    K: StructuredMatrix,
    C: StructuredMatrix,
    *,
    loss_average: str | None,
    stat_div: float,
    materialized: bool,
) -> Statistics:
    """The statistics of the update from the accumulators: H_K the mean over all rows,
    H_C times the loss-term count (``loss_average``) and divided by ``stat_div**2`` (the
    loss scale). Scales stay separate numbers unless the dtype differs from the factor's
    or ``materialized`` (the tensors are reduced across ranks)."""
    n_total = acc_C.count if loss_average is not None else 1
    H_K, s_K = acc_K.value_and_scale(1.0 / acc_K.count)
    H_C, s_C = acc_C.value_and_scale(n_total / (stat_div * stat_div))
    if H_K.dtype != K.dtype or materialized:
        H_K, s_K = materialize(H_K, s_K, K.dtype), 1.0
    if H_C.dtype != C.dtype or materialized:
        H_C, s_C = materialize(H_C, s_C, C.dtype), 1.0
    return Statistics(H_K, H_C, s_K, s_C, acc_K.square_sums, acc_C.square_sums)
