"""Full triangular structures ``tril`` and ``triu`` (``d (d + 1) / 2`` free entries).

The matrix is kept as a dense ``(d, d)`` tensor whose entries outside the triangle are zero;
``numel()`` counts the free entries of the pattern. Small matrices multiply by plain BLAS
calls on that tensor; from ``BLOCKED_FROM`` up the products run block by block (blocks of
``BLOCK`` rows/columns) and skip the zero blocks, since torch has no CPU triangular matmul.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix, symmetric_gram


@lru_cache(maxsize=32)
def _pi_mask(d: int, lower: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """2 on the one-sided entries of the triangle, 1 on the diagonal, 0 elsewhere."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensor, usable anywhere
        full = torch.full((d, d), 2.0, dtype=dtype, device=device)
        mask = full.tril_() if lower else full.triu_()
        mask.diagonal().fill_(1.0)
        return mask


# ---------------------------------------------------------------------- blocked products
#: Matrices of at least this size use the blocked triangular products below (smaller ones:
#: one BLAS product of the masked dense tensor, which is cheaper than several small calls;
#: from here the blocks' skipped zero half saves more than their extra calls cost).
BLOCKED_FROM = 192
#: Width of the blocks of the blocked products (the last block takes the remainder):
#: narrower blocks add calls, wider ones skip less of the zero half.
BLOCK = 128


def _blocks(d: int) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` of the diagonal blocks of a size-``d`` matrix: width ``BLOCK``,
    the remainder merged into the last block."""
    return _block_edges(d, BLOCK)


@lru_cache(maxsize=64)
def _block_edges(d: int, width: int) -> tuple[tuple[int, int], ...]:
    """:func:`_blocks` for a given block width (cached)."""
    p = max(1, round(d / width))
    edges = [i * width for i in range(p)] + [d]
    return tuple(zip(edges[:-1], edges[1:]))


#: Products with a dense ``(d, n)`` operand run blocked only from ``d * n`` this large (the
#: thin ones are bound by reading the matrix and call overhead, not flops).
BLOCKED_DENSE_FROM = 16384


#: ``S S^T X`` with at most this many columns in ``X`` runs as ``(X^T S S^T)^T``: BLAS
#: products with a thin right-hand side are slower than the transposed, wide form; from
#: 16 columns the plain form wins.
THIN = 12


def blocked(d: int, n: int | None = None) -> bool:
    """Whether CPU products of size-``d`` triangular matrices (with a dense operand of ``n``
    columns, if given) run blocked; the sizes were measured on one CPU thread."""
    return d >= BLOCKED_FROM and (n is None or d * n >= BLOCKED_DENSE_FROM)


def tri_dense(T: Tensor, lower: bool, X: Tensor) -> Tensor:
    """``T @ X`` for a triangular ``T`` (lower or upper, zero off the triangle) by block
    rows, skipping the zero blocks."""
    out = X.new_empty(T.shape[0], X.shape[1])
    for s, e in _blocks(T.shape[0]):
        if lower:
            torch.mm(T[s:e, :e], X[:e], out=out[s:e])
        else:
            torch.mm(T[s:e, s:], X[s:], out=out[s:e])
    return out


def dense_tri(X: Tensor, T: Tensor, lower: bool) -> Tensor:
    """``X @ T`` for a triangular ``T`` by block columns, skipping the zero blocks."""
    out = X.new_empty(X.shape[0], T.shape[1])
    for s, e in _blocks(T.shape[0]):
        if lower:
            torch.mm(X[:, s:], T[s:, s:e], out=out[:, s:e])
        else:
            torch.mm(X[:, :e], T[:e, s:e], out=out[:, s:e])
    return out


def tri_tri(A: Tensor, B: Tensor, lower: bool) -> Tensor:
    """``A @ B`` for two triangular matrices of the same kind, block by block: only the
    blocks inside the triangle and only their non-zero terms (about 1/3 of the flops at
    4 blocks); the result is exactly triangular."""
    blocks = _blocks(A.shape[0])
    out = A.new_empty(A.shape)
    for j, (sj, ej) in enumerate(blocks):
        for i, (si, ei) in enumerate(blocks):
            if lower and i >= j:  # sum over k = j..i of A[i, k] B[k, j]
                torch.mm(A[si:ei, sj:ei], B[sj:ei, sj:ej], out=out[si:ei, sj:ej])
            elif not lower and i <= j:  # k = i..j
                torch.mm(A[si:ei, si:ej], B[si:ej, sj:ej], out=out[si:ei, sj:ej])
            else:
                out[si:ei, sj:ej].zero_()
    return out.tril_() if lower else out.triu_()


def tri_dense_part(T: Tensor, lower: bool, B: Tensor) -> Tensor:
    """The blocks of ``T @ B`` on the side of the diagonal opposite to ``T``'s triangle
    (upper for a lower ``T``, lower for an upper ``T``; diagonal blocks whole, the other
    blocks zero) for a triangular ``T``: the half of a symmetric ``T @ B`` that ``Pi``
    needs, e.g. ``K^T K`` or ``K^T (A K)``, at about 1/3 of the flops at 4 blocks."""
    out = B.new_empty(T.shape[0], B.shape[1])
    for s, e in _blocks(T.shape[0]):
        if lower:  # upper blocks of row block i: columns from s
            torch.mm(T[s:e, :e], B[:e, s:], out=out[s:e, s:])
            out[s:e, :s].zero_()
        else:  # lower blocks: columns up to e
            torch.mm(T[s:e, s:], B[s:, :e], out=out[s:e, :e])
            out[s:e, e:].zero_()
    return out


def gram_part(Y: Tensor, lower: bool) -> Tensor:
    """The lower (or upper) blocks of ``Y^T Y`` (diagonal blocks whole, the rest zero)."""
    d = Y.shape[1]
    out = Y.new_empty(d, d)
    for s, e in _blocks(d):
        if lower:
            torch.mm(Y[:, s:e].T, Y[:, :e], out=out[s:e, :e])
            out[s:e, e:].zero_()
        else:
            torch.mm(Y[:, s:e].T, Y[:, s:], out=out[s:e, s:])
            out[s:e, :s].zero_()
    return out


class Triangular(StructuredMatrix):
    """Lower or upper triangular matrix; stored ``mat`` ``(dim, dim)``, zero off the triangle."""

    lower: ClassVar[bool] = True
    _fields = ("mat",)
    mat: Tensor

    def __init__(self, mat: Tensor) -> None:
        """Wrap a ``(dim, dim)`` triangular tensor (not copied); off-triangle must be zero."""
        self._check_square(mat, "mat")
        outside = mat.triu(1) if self.lower else mat.tril(-1)
        if outside.any():
            raise ValueError(f"{self.name}: mat has non-zero entries outside the triangle")
        self.dim = mat.shape[0]
        self._validate(mat)

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        return ((dim, dim),)

    def numel(self) -> int:
        return self.dim * (self.dim + 1) // 2

    # ------------------------------------------------------------------ Pi
    @classmethod
    def _project(cls, sym: Tensor) -> Triangular:
        """Pi for a triangle, in place on a fresh symmetric tensor: keep the triangle,
        doubling the one-sided off-diagonal entries (one product with a cached weight mask)."""
        d = sym.shape[0]
        return cls._wrap(d, sym.mul_(_pi_mask(d, cls.lower, sym.dtype, sym.device)))

    @classmethod
    def _from_dense(cls, mat: Tensor) -> Triangular:
        return cls._project(mat.clone())

    def _mask_(self, mat: Tensor) -> Tensor:
        """Zero the entries of a fresh tensor outside the triangle (rounding noise)."""
        return mat.tril_() if self.lower else mat.triu_()

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        return self.mat.clone()

    def diag_add_(self, value: Scalar) -> Triangular:
        self.mat.diagonal().add_(value)
        return self

    def trace(self) -> Tensor:
        return self.mat.trace()

    def _blocked(self, n: int | None = None, other: Tensor | None = None) -> bool:
        """Whether a product with this matrix (and ``other``, a dense operand of ``n``
        columns or another triangle) runs blocked: on the CPU only (where the sizes were
        measured), and not where autograd must record it (``out=`` products are not)."""
        mat = self.mat
        if mat.device.type != "cpu" or not blocked(self.dim, n):
            return False
        if torch.is_grad_enabled():
            return not (mat.requires_grad or (other is not None and other.requires_grad))
        return True

    def _matmul(self, other: Triangular) -> Triangular:
        if self._blocked(None, other.mat):
            return self._wrap(self.dim, tri_tri(self.mat, other.mat, self.lower))
        return self._wrap(self.dim, self._mask_(self.mat @ other.mat))

    def _matmat(self, X: Tensor) -> Tensor:
        if self._blocked(X.shape[1], X):
            return tri_dense(self.mat, self.lower, X)
        return self.mat @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        if self._blocked(X.shape[1], X):
            return tri_dense(self.mat.T, not self.lower, X)
        return self.mat.T @ X

    def _from_inner(self, X: Tensor) -> Triangular:
        if self._blocked(X.shape[1], X):
            Y = dense_tri(X.T, self.mat, self.lower)  # X^T S
            return self._project(gram_part(Y, self.lower))
        return self._project(symmetric_gram(X.T @ self.mat))

    def _from_inner_eye(self) -> Triangular:
        if self._blocked():
            return self._project(tri_dense_part(self.mat.T, not self.lower, self.mat))
        return self._project(symmetric_gram(self.mat))

    def _from_gram(self, A: Tensor) -> Triangular:
        """``Pi(S^T A S)``: blocked triangular products from ``_blocked`` sizes."""
        if self._blocked(None, A):
            AS = dense_tri(A, self.mat, self.lower)
            return self._project(tri_dense_part(self.mat.T, not self.lower, AS))
        return self._project(self.mat.T @ A @ self.mat)

    def gram_left(self, X: Tensor) -> Tensor:
        """``S S^T X`` for ``X`` of shape ``(dim, n)``."""
        if X.shape[1] <= THIN and self.dim >= 2 * THIN and X.device.type == "cpu":
            return self.gram_right(X.T).T.contiguous()  # as (X^T S S^T)^T: see THIN
        if self._blocked(X.shape[1], X):
            return tri_dense(self.mat, self.lower, tri_dense(self.mat.T, not self.lower, X))
        return self.mat @ (self.mat.T @ X)

    def gram_right(self, X: Tensor) -> Tensor:
        """``X S S^T`` for ``X`` of shape ``(n, dim)``."""
        if self._blocked(X.shape[0], X):
            XS = dense_tri(X, self.mat, self.lower)
            return dense_tri(XS, self.mat.T, not self.lower)
        return (X @ self.mat) @ self.mat.T

    def gram_matrix(self) -> Tensor:
        """The dense symmetric ``S S^T`` (e.g. a preconditioner cache)."""
        if not self._blocked():
            return self.mat @ self.mat.T
        # the blocks of S S^T opposite to the triangle, then mirrored into the others
        out = tri_dense_part(self.mat, self.lower, self.mat.T)
        for s, e in _blocks(self.dim)[1:]:
            if self.lower:
                out[s:e, :s].copy_(out[:s, s:e].T)
            else:
                out[:s, s:e].copy_(out[s:e, :s].T)
        return out


class Tril(Triangular):
    """Lower triangular matrix."""

    name = "tril"
    lower = True


class Triu(Triangular):
    """Upper triangular matrix."""

    name = "triu"
    lower = False
