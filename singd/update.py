"""The math of SINGD as plain functions on structured matrices (see docs/architecture.md,
'singd: the optimizer', and the paper's update rules restated there).

* :func:`riemannian_step`: from the statistics ``H_K, H_C`` to the new ``K, C`` (INGD, or
  IKFAC with ``kfac_like=True``), with Riemannian momentum and ``normalize_lr_cov``.
* :func:`precondition`: ``C C^T G K K^T`` by products with K, K^T, C, C^T, or with cached
  Gram matrices ``K K^T`` / ``C C^T`` from :func:`gram` (two products instead of four);
  :func:`precondition_diagonal` for many all-diagonal layers at once.
* :func:`heavy_ball_`: weight decay after preconditioning and the heavy-ball update, foreach;
  :func:`heavy_ball_step_` keeps its buffers in an optimizer's ``state``.

Like ``torch.optim.adamw``'s functional form the functions update their matrix and tensor
arguments in place where the docstring says so and return the results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch
from torch import Tensor

from singd.first_order import add_
from singd.structures import (
    BlockDiagonal,
    Dense,
    Diagonal,
    StructuredMatrix,
    Triangular,
    TriangularToeplitz,
)
from singd.structures import toeplitz as _toeplitz
from singd.structures.base import cached_constant, symmetric_gram


def _scaled(S: StructuredMatrix, factor: Tensor | float) -> StructuredMatrix:
    """``S *= factor`` in place (skips the multiplication by a Python 1.0)."""
    if isinstance(factor, float) and factor == 1.0:
        return S
    return S.mul_(factor)


def _m_hat(
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    K: StructuredMatrix,
    C: StructuredMatrix,
    damping: float,
    kfac_like: bool,
    half: float,
    scale_K: float,
    scale_C: float,
) -> tuple[StructuredMatrix, StructuredMatrix]:
    """The new momentum terms ``m_K^``, ``m_C^`` (consumes ``H_K``, ``H_C`` in place); the
    statistics are ``scale_K * H_K`` and ``scale_C * H_C``."""
    KtK = K.from_inner()
    CtC = C.from_inner()
    if kfac_like:
        m_K = H_K.mul_(half * scale_K).add_(KtK, alpha=damping * half).diag_add_(-half)
        m_C = H_C.mul_(half * scale_C).add_(CtC, alpha=damping * half).diag_add_(-half)
        return m_K, m_C
    # 1/2 (avgtr(H_C) H_K + lambda avgtr(C^T C) Pi(K^T K) - I) and likewise for C: the four
    # coefficients (avgtr = trace / dim) from one stack of traces times cached weights, as
    # 0-dim tensors (no host sync)
    traces = torch.stack([H_C.trace(), CtC.trace(), H_K.trace(), KtK.trace()])
    both, dh = half * scale_K * scale_C, damping * half
    w = (both / C.dim, dh / C.dim, both / K.dim, dh / K.dim)
    coef = traces.mul_(cached_constant(w, traces.dtype, traces.device))
    m_K = H_K.mul_(coef[0]).add_(KtK, alpha=coef[1]).diag_add_(-half)
    m_C = H_C.mul_(coef[2]).add_(CtC, alpha=coef[3]).diag_add_(-half)
    return m_K, m_C


def spectral_bound(m: StructuredMatrix) -> Tensor:
    """``sqrt(||m||_1 ||m||_inf) >= ||m||_2`` (largest absolute column and row sums) as a
    0-dim float32 tensor: exact for a diagonal ``m``, two structured mat-vecs otherwise."""
    if isinstance(m, Diagonal):
        return m.diag.abs().max().float()
    absolute = type(m)._wrap(m.dim, *(t.abs() for t in m._tensors()))
    ones = torch.ones(m.dim, 1, dtype=m.dtype, device=m.device)
    rows = (absolute @ ones).max().float()
    columns = (ones.T @ absolute).max().float()
    return (rows * columns).sqrt()


def _reach(m: StructuredMatrix, beta: float | Tensor, guard: float) -> float:
    """``beta`` times a bound on ``||m||_2``: the Frobenius norm where that already shows the
    step within ``guard`` (the common case: a few ops), else :func:`spectral_bound`."""
    if isinstance(m, TriangularToeplitz):  # stored entries repeat along the diagonals
        cheap = m.frobenius_norm()
    else:  # every entry is stored (at least) once: the stored tensors' norm bounds ||m||_F
        tensors = m._tensors()
        norms = torch._foreach_norm(tensors)
        cheap = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    reach = float(beta * float(cheap))
    if reach <= guard:
        return reach
    return float(beta * spectral_bound(m))


def riemannian_step(
    K: StructuredMatrix,
    C: StructuredMatrix,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    m_K: StructuredMatrix | None,
    m_C: StructuredMatrix | None,
    *,
    damping: float,
    alpha1: float,
    lr_cov: float,
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    scale_K: float = 1.0,
    scale_C: float = 1.0,
    guard: float | None = None,
    observe: Callable[[str, float], None] | None = None,
) -> tuple[StructuredMatrix, StructuredMatrix, StructuredMatrix | None, StructuredMatrix | None]:
    """One preconditioner update ``K <- K - beta1 K m_K``, ``C <- C - beta1 C m_C``.

    ``H_K = Pi(K^T a^T a K)`` and ``H_C = Pi(C^T g^T g C)`` are consumed (overwritten).
    ``m_K``/``m_C`` are the Riemannian momenta (updated in place and returned), or None when
    ``alpha1 == 0`` (then the returned momenta are None too). ``kfac_like`` (IKFAC) uses
    ``m^ = 1/2 (H + lambda Pi(K^T K) - I)`` and ignores ``alpha1``. ``K`` and ``C`` are
    updated in place and returned. ``scale_K``/``scale_C`` multiply the statistics (so that
    callers need not rescale them first). Layers whose K and C are both diagonal have a
    faster batched form, :func:`diagonal_steps`.

    ``guard`` (the trust region of the factor update): where ``beta1 b(m)`` exceeds it, with
    ``b(m)`` the bound :func:`spectral_bound` on ``||m||_2``, beta1 shrinks to
    ``guard / b(m)``, so the singular values of ``I - beta1 m`` stay within ``1 +- guard`` and
    one update cannot scale the factor by more than ``1 + guard``. Below it the update is
    the unguarded one, bit for bit. ``observe(factor, beta1 b(m))`` ("K" or "C") is called
    for every factor when a guard is set.
    """
    if kfac_like:
        alpha1 = 0.0
    half = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    mh_K, mh_C = _m_hat(H_K, H_C, K, C, damping, kfac_like, half, scale_K, scale_C)
    if alpha1 > 0.0 and m_K is not None and m_C is not None:
        m_K = m_K.mul_(alpha1).add_(mh_K)
        m_C = m_C.mul_(alpha1).add_(mh_C)
        new_K, new_C = m_K, m_C
    else:
        new_K, new_C = mh_K, mh_C
        m_K = m_C = None
    for side, F, m in (("K", K, new_K), ("C", C, new_C)):
        step = F @ m
        if normalize_lr_cov:
            beta = lr_cov / torch.clamp(m.infinity_vector_norm().float(), min=1.0)
        else:
            beta = lr_cov
        if guard is not None:
            reach = _reach(m, beta, guard)
            if observe is not None:
                observe(side, reach)
            if reach > guard:
                beta = beta * (guard / reach)
                F.add_(step.mul_(-torch.as_tensor(beta).to(F.dtype)))
                continue
        if normalize_lr_cov:
            F.add_(step.mul_(-beta.to(F.dtype)))
        else:
            F.add_(step, alpha=-lr_cov)
    return K, C, m_K, m_C


#: Non-diagonal factors up to this size get a dense ``F F^T`` cache whatever their structure
#: and the other factor's size (T > 1), and take their statistics from ``X^T X`` when there
#: are more rows than columns (:func:`gram_route`).
DENSE_GRAM_MAX = 256


@functools.lru_cache(maxsize=64)
def _segments(lengths: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Segment ids (``i`` repeated ``lengths[i]`` times) and the lengths, cached per shape
    (for :func:`diagonal_steps`)."""
    counts = torch.tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), counts), counts


def diagonal_steps(
    Ks: list[Diagonal],
    Cs: list[Diagonal],
    H_Ks: list[Diagonal],
    H_Cs: list[Diagonal],
    m_Ks: list[Diagonal] | None,
    m_Cs: list[Diagonal] | None,
    *,
    damping: float,
    alpha1: float,
    lr_cov: float,
    kfac_like: bool = False,
    normalize_lr_cov: bool = False,
    scales_K: list[float] | None = None,
    scales_C: list[float] | None = None,
    square_sums: bool = False,
    guard: float | None = None,
    observe: Callable[[int, str, float], None] | None = None,
) -> list[Tensor]:
    """:func:`riemannian_step` for several layers whose K and C are all diagonal, of one dtype.

    The math is elementwise, so it runs on one vector holding every K and C entry (a few
    ops for all layers instead of about 25 per layer; per-factor averaged traces by one
    ``index_add_``, in float32 for 16-bit factors). K, C and the momenta are updated in
    place; ``H_Ks``/``H_Cs`` are consumed; ``m_Ks``/``m_Cs`` None (or ``alpha1 == 0``, or
    ``kfac_like``) means no Riemannian momentum. ``square_sums``: the statistics are the
    column sums of squares of the data (``diag(X^T X)``), not yet multiplied by the squared
    factor entries. ``guard`` is :func:`riemannian_step`'s, per factor; ``observe(layer
    index, "K" or "C", beta1 ||m||_F)`` is called for each factor it shrinks. Returns the
    squared new entries of every K, then every C (views of one tensor: the ``F F^T`` of
    :func:`gram`).
    """
    n = len(Ks)
    if n == 0:
        return []
    if kfac_like:
        alpha1 = 0.0
    half = 0.5 * (1.0 - alpha1) if normalize_lr_cov else 0.5
    sK = [1.0] * n if scales_K is None else scales_K
    sC = [1.0] * n if scales_C is None else scales_C
    f = [K.diag for K in Ks] + [C.diag for C in Cs]
    lengths = tuple(t.shape[0] for t in f)
    F = torch.cat(f)
    dtype, device = F.dtype, F.device
    ids, counts = _segments(lengths, device)
    H = torch.cat([H.diag for H in H_Ks] + [H.diag for H in H_Cs])
    sq = F * F  # k^2, c^2: Pi(K^T K), Pi(C^T C)
    if square_sums:
        H.mul_(sq)  # Pi(F^T X^T X F) = f^2 * diag(X^T X)
    if kfac_like:
        coef = [half * s for s in sK] + [half * s for s in sC]
        if len(set(coef)) == 1:
            H.mul_(coef[0])
        else:
            H.mul_(torch.tensor(coef, dtype=dtype, device=device)[ids])
        m = H.add_(sq, alpha=damping * half)
    else:
        # averaged traces avgtr(H_K), avgtr(H_C) (row 0) and avgtr(K^T K), avgtr(C^T C) (row 1)
        both = torch.stack([H, sq])
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        tr = both.new_zeros((2, 2 * n), dtype=acc).index_add_(1, ids, both.to(acc))
        tr = tr.div_(counts)
        tr = torch.cat([tr[:, n:], tr[:, :n]], dim=1)  # K_i takes C_i's traces and vice versa
        w = [half * a * b for a, b in zip(sK, sC)]
        w = torch.tensor([w + w, [damping * half] * (2 * n)], dtype=acc, device=device)
        coef = tr.mul_(w).to(dtype).index_select(1, ids)
        m = torch.addcmul(H.mul_(coef[0]), sq, coef[1])  # avgtr(H_C) H_K + ... (and for C)
    m.sub_(half)  # m^
    if alpha1 > 0.0 and m_Ks is not None and m_Cs is not None:
        mf = [M.diag for M in m_Ks] + [M.diag for M in m_Cs]
        m = torch.cat(mf).mul_(alpha1).add_(m)
        torch._foreach_copy_(mf, m.split(lengths))
    if normalize_lr_cov:
        peaks = m.new_zeros(2 * n, dtype=torch.float32)
        peaks.scatter_reduce_(0, ids, m.abs().float(), "amax").clamp_(min=1.0)
        betas = lr_cov / peaks
        if guard is not None:
            _guard_diagonal(m, ids, betas, guard, observe, n)
        beta = betas.to(dtype).index_select(0, ids)
        F.addcmul_(F, m.mul_(beta), value=-1.0)  # K <- K - beta1 / max(1, |m|_inf) K m
    else:
        if guard is not None:
            _guard_diagonal(m, ids, lr_cov, guard, observe, n)
        F.addcmul_(F, m, value=-lr_cov)  # K <- K - beta1 K m
    torch._foreach_copy_(f, F.split(lengths))
    return list(F.square_().split(lengths))


def _guard_diagonal(
    m: Tensor,
    ids: Tensor,
    betas: Tensor | float,
    guard: float,
    observe: Callable[[int, str, float], None] | None,
    n: int,
) -> None:
    """Shrink, in place, the segments of ``m`` whose ``beta max|m|`` (the spectral norm of a
    diagonal matrix) exceeds ``guard`` to reach it exactly (one host read; nothing changes
    where no factor exceeds it). ``betas``: one per factor, or one for all."""
    if isinstance(betas, float):
        if float(m.abs().max()) * betas <= guard:  # no factor reaches the guard
            return
        betas = torch.full((2 * n,), betas, dtype=torch.float32, device=m.device)
    peaks = torch.zeros(2 * n, dtype=torch.float32, device=m.device)
    reach = peaks.scatter_reduce_(0, ids, m.abs().float(), "amax").mul_(betas)
    if not float(reach.max()) > guard:
        return
    shrink = (guard / reach).clamp_(max=1.0)
    m.mul_(shrink.to(m.dtype).index_select(0, ids))
    if observe is not None:
        for i, r in enumerate(reach.tolist()):
            if r > guard:
                observe(i % n, "K" if i < n else "C", r)


def inner_statistic(F: StructuredMatrix, rows: Tensor) -> StructuredMatrix:
    """``Pi(F^T X^T X F)`` for data ``X = rows`` of shape ``(R, dim)``, in F's dtype.

    With ``R > dim`` the factors of :func:`gram_route` form ``X^T X`` first (dense storage:
    ``2 R d^2 + 4 d^3`` instead of ``4 R d^2`` flops); every other case is
    ``F.from_inner(X^T)``, which never forms a ``d x d`` matrix for sparse structures.
    """
    if rows.shape[0] > F.dim and gram_route(F):
        return F.from_gram(symmetric_gram(rows))
    return F.from_inner(rows.T)


def gram_route(F: StructuredMatrix) -> bool:
    """Whether ``Pi(F^T X^T X F)`` is cheaper from ``X^T X`` when X has more rows than
    columns: dense-storage factors, and the other non-diagonal factors up to
    ``DENSE_GRAM_MAX`` (there one BLAS Gram and a projection cost less than their structured
    row products, and block-diagonal conv statistics skip the row matrix)."""
    if isinstance(F, (Dense, Triangular)):
        return True
    return F.dim <= DENSE_GRAM_MAX and not isinstance(F, Diagonal)


def diagonal_statistic(F: Diagonal, square_sums: Tensor) -> Diagonal:
    """``Pi(F^T X^T X F)`` for a diagonal ``F`` from the column sums of squares of ``X``
    (``square_sums`` is consumed)."""
    return Diagonal._wrap(F.dim, square_sums.mul_(F.diag).mul_(F.diag))


# ---------------------------------------------------------------------- preconditioning
@dataclass
class Gram:
    """A cached ``F F^T`` for a factor ``F``: ``kind`` says how ``value`` is stored.

    ``"dense"``: a ``(d, d)`` tensor; ``"diag"``: a ``(d,)`` vector; ``"structured"``: a
    symmetric matrix of the factor's own structure (block-diagonal factors).
    """

    kind: str
    value: Tensor | StructuredMatrix

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        v = self.value
        tensors = [v] if isinstance(v, Tensor) else list(v.to_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)


def gram(F: StructuredMatrix, other_dim: int | None = None, T: int = 1) -> Gram | None:
    """``F F^T`` in a form cheaper to apply than two products with ``F``, or None.

    Diagonal: the squared entries. Dense and triangular: a dense matrix. With ``T > 1`` any
    other factor with ``dim <= DENSE_GRAM_MAX`` gets a dense matrix too (reused over T
    steps, one BLAS product per step beats the several small products of a structured
    application at these sizes, whatever the flop count); otherwise block-diagonal factors
    get their block Grams and the rest None. With ``other_dim`` (the size of the other
    Kronecker factor) and ``T``, factors above ``DENSE_GRAM_MAX`` get None where computing the
    cache once per ``T`` steps costs more than it saves (``dim > T * other_dim``).
    """
    if isinstance(F, Diagonal):
        return Gram("diag", F.diag.square())
    if F.dim > DENSE_GRAM_MAX and other_dim is not None and F.dim > T * other_dim:
        return None
    if isinstance(F, Triangular):
        return Gram("dense", F.gram_matrix())
    if isinstance(F, Dense):
        return Gram("dense", F.mat @ F.mat.T)
    if F.dim <= DENSE_GRAM_MAX and T > 1:
        if isinstance(F, BlockDiagonal):  # one batched product, then scattered
            return Gram("dense", F.gram_blocks().to_dense())
        dense = F.to_dense()
        return Gram("dense", dense @ dense.T)
    if isinstance(F, BlockDiagonal):
        return Gram("structured", F.gram_blocks())
    return None


def _toeplitz_rows(F: TriangularToeplitz, R: Tensor) -> Tensor:
    """``R F F^T`` for ``R`` of shape ``(n, d)`` by two FFT passes along its rows (no
    transposed copies); ``F`` is large enough for its FFT path."""
    ftype = _toeplitz._fft_dtype(R.dtype)
    Y = F._fft_lower_rows(R.to(ftype), transpose=F.lower)  # (F^T R^T)^T
    Y = F._fft_lower_rows(Y, transpose=not F.lower)  # (F F^T R^T)^T
    return Y.to(R.dtype)


def _fft_toeplitz(F: StructuredMatrix) -> bool:
    """Whether ``F`` is a Toeplitz factor whose products run by FFT."""
    return isinstance(F, TriangularToeplitz) and F.dim >= _toeplitz._DENSE_BELOW


def _apply_left(F: StructuredMatrix, P: Gram | None, X: Tensor) -> Tensor:
    """``F F^T X`` for ``X`` of shape ``(d, n)``."""
    if P is None:
        if _fft_toeplitz(F):
            return _toeplitz_rows(F, X.T).T
        if isinstance(F, Diagonal):
            return F.diag.square().unsqueeze(1) * X
        if isinstance(F, Triangular):
            return F.gram_left(X)
        if isinstance(F, Dense):
            return F.mat @ (F.mat.T @ X)
        if isinstance(F, TriangularToeplitz):  # below the FFT sizes: one dense matrix
            S = F.to_dense()
            return S @ (S.T @ X)
        return F @ F.rmatmat(X)
    if P.kind == "dense":
        return P.value @ X
    if P.kind == "diag":
        return P.value.unsqueeze(1) * X
    return P.value @ X


def _apply_right(F: StructuredMatrix, P: Gram | None, X: Tensor) -> Tensor:
    """``X F F^T`` for ``X`` of shape ``(n, d)``."""
    if P is None:
        if _fft_toeplitz(F):
            return _toeplitz_rows(F, X)
        if isinstance(F, Diagonal):
            return X * F.diag.square()
        if isinstance(F, Triangular):
            return F.gram_right(X)
        if isinstance(F, Dense):
            return (X @ F.mat) @ F.mat.T
        if isinstance(F, TriangularToeplitz):  # below the FFT sizes: one dense matrix
            S = F.to_dense()
            return (X @ S) @ S.T
        return (F @ F.rmatmat(X.T)).T
    if P.kind == "dense":
        return X @ P.value
    if P.kind == "diag":
        return X * P.value
    return (P.value @ X.T).T


def precondition(
    G: Tensor,
    K: StructuredMatrix,
    C: StructuredMatrix,
    gram_K: Gram | None = None,
    gram_C: Gram | None = None,
) -> Tensor:
    """``C C^T G K K^T`` for ``G`` of shape ``(d_C, d_K)``.

    The K side runs in K's dtype, the C side in C's; the result has ``G``'s dtype.
    ``gram_K``/``gram_C`` are optional caches from :func:`gram` of the current factors.
    """
    out_dtype = G.dtype
    X = _apply_right(K, gram_K, G if G.dtype == K.dtype else G.to(K.dtype))
    X = _apply_left(C, gram_C, X if X.dtype == C.dtype else X.to(C.dtype))
    return X if X.dtype == out_dtype else X.to(out_dtype)


def precondition_diagonal(
    grads: list[Tensor], lefts: list[Tensor], rights: list[Tensor]
) -> list[Tensor]:
    """:func:`precondition` for parameters of layers whose K and C are diagonal: each
    gradient times its broadcastable views of the squared C entries (``lefts``) and squared
    K entries (``rights``) from :meth:`singd.capture.Layer.diagonal_scales`, as new tensors;
    two foreach ops for all parameters instead of a concatenation, two products and a
    split per layer."""
    if not grads:
        return []
    out = torch._foreach_mul(grads, lefts)
    torch._foreach_mul_(out, rights)
    return out


# ---------------------------------------------------------------------- parameter update
def heavy_ball_(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    compensations: list[Tensor | None] | None = None,
) -> list[Tensor | None]:
    """``s = d + gamma p``; ``buf <- alpha2 buf + s`` (buf starts at zero); ``p -= lr buf``.

    ``directions`` may be modified in place (pass copies when they must survive). Returns the
    new buffers (None everywhere when ``momentum == 0``); ``params`` are updated in place,
    Kahan-compensated where ``compensations`` has a buffer (:func:`singd.first_order.add_`).
    """
    if not params:
        return buffers
    if weight_decay != 0.0:
        torch._foreach_add_(directions, params, alpha=weight_decay)
    if momentum == 0.0:
        _apply(params, directions, lr, compensations)
        return [None] * len(params)
    fresh = [i for i, b in enumerate(buffers) if b is None]
    for i in fresh:
        buffers[i] = directions[i].clone()
    fresh_set = set(fresh)
    old = [i for i in range(len(buffers)) if i not in fresh_set]
    if old:
        bufs = [buffers[i] for i in old]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, [directions[i] for i in old])
    _apply(params, buffers, lr, compensations)
    return buffers


def _apply(
    params: list[Tensor], steps: list[Tensor], lr: float, compensations: list | None
) -> None:
    """``p -= lr * step`` for each pair, compensated where a buffer is given."""
    if compensations is None or all(c is None for c in compensations):
        torch._foreach_add_(params, steps, alpha=-lr)
    else:
        add_(params, steps, alpha=-lr, compensations=compensations)


def grafted_heavy_ball_(
    params: list[Tensor],
    directions: list[Tensor],
    buffers: list[Tensor | None],
    norms_from: list[Tensor],
    units: list[int],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    compensations: list[Tensor | None] | None = None,
) -> list[Tensor | None]:
    """Heavy-ball on ``directions``, each unit's step rescaled to the norm of ``norms_from``.

    ``buf <- alpha2 buf + d`` (buf starts at zero); per unit ``u`` (``units[i]`` names the
    unit of parameter ``i``: a layer's weight and bias form one) the step is
    ``buf * ||a_u|| / ||buf_u||`` where ``a = norms_from`` (Adam's update direction for
    grafting; a unit whose buffer is zero does not move); then
    ``p -= lr (step + gamma p)`` (decoupled weight decay, as AdamW). The step of a unit thus
    has Adam's norm and SINGD's direction, momentum included, so ``lr`` means what it means
    for AdamW. ``directions`` are consumed. Returns the buffers (None for ``momentum == 0``).
    """
    if not params:
        return buffers
    if momentum == 0.0:
        buffers = list(directions)
    else:
        for i, b in enumerate(buffers):
            if b is None:
                buffers[i] = directions[i]
            else:
                b.mul_(momentum).add_(directions[i])
    ids = torch.tensor(units, device=params[0].device)
    count = int(max(units)) + 1
    sums = torch.zeros((2, count), dtype=torch.float32, device=params[0].device)
    both = torch.stack(
        [
            torch.stack(torch._foreach_norm(buffers)).float(),
            torch.stack(torch._foreach_norm(norms_from)).float(),
        ]
    )
    sums.index_add_(1, ids, both.square())
    ratio = torch.where(sums[0] > 0, sums[1].sqrt() / sums[0].sqrt(), torch.zeros_like(sums[0]))
    scales = ratio[ids].tolist()
    steps = torch._foreach_mul(buffers, scales)
    if weight_decay != 0.0:
        torch._foreach_add_(steps, list(params), alpha=weight_decay)
    _apply(params, steps, lr, compensations)
    return [None] * len(params) if momentum == 0.0 else buffers


def heavy_ball_step_(
    state: MutableMapping[Tensor, dict],
    params: list[Tensor],
    directions: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    compensations: list[Tensor | None] | None = None,
) -> None:
    """:func:`heavy_ball_` with each parameter's buffer in ``state[p]["momentum_buffer"]``
    (an optimizer's ``state``; a buffer is moved to its parameter's dtype and device where
    they differ, and directions are cast to the parameter's dtype)."""
    bufs = []
    for p in params:
        buf = state[p].get("momentum_buffer") if p in state else None
        if buf is not None and (buf.dtype != p.dtype or buf.device != p.device):
            buf = buf.to(dtype=p.dtype, device=p.device)
        bufs.append(buf)
    dirs = [d if d.dtype == p.dtype else d.to(p.dtype) for d, p in zip(directions, params)]
    new = heavy_ball_(
        params,
        dirs,
        bufs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        compensations=compensations,
    )
    if momentum > 0:
        for p, buf in zip(params, new):
            state[p]["momentum_buffer"] = buf
