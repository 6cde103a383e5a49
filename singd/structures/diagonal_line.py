"""The shared base of the four sparse triangular structures: a diagonal plus one row or column.

Each is ``D + e_p u^T`` (the line is row ``p``) or ``D + u e_p^T`` (column ``p``) with ``D``
diagonal, ``p`` the first or last index and ``u[p] = 0``, so that the line lies in a triangle:

* ``triltopleftdiag``: last row (lower);  ``triubottomrightdiag``: first row (upper);
* ``trilbottomrightdiag``: first column (lower);  ``triutopleftdiag``: last column (upper).

Storage: one tensor ``data`` of shape ``(2, d)`` holding the diagonal ``delta`` (row 0) and
``u`` (row 1, whose entry ``p`` is a zero pad): ``2d - 1`` free entries. The pattern is closed
under products: for the row form ``S S' = D D' + e_p (D' u + delta_p u')^T``, for the column
form ``S S' = D D' + (D u' + delta'_p u) e_p^T``; the pad stays zero. Every operation costs
``O(d)`` or ``O(d n)`` with a ``(d, n)`` operand; none forms a ``d x d`` intermediate (only
``from_gram``, whose operand is ``d x d`` already).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix


class DiagonalLine(StructuredMatrix):
    """A diagonal plus one row (``by_row = True``) or column through the first (``at_first = True``)
    or last index; stored as ``data`` ``(2, dim)`` (see the module docstring)."""

    #: Whether the line is a row (else a column) and whether it is the first (else the last).
    by_row: ClassVar[bool] = True
    at_first: ClassVar[bool] = False
    _fields = ("data",)
    data: Tensor

    def _init(self, diag: Tensor, line: Tensor) -> None:
        """Build from the other diagonal entries ``(dim - 1,)`` and the line ``(dim,)``, whose
        corner entry is the diagonal entry it crosses (the reference package's layout)."""
        self._check_concrete()
        for arg, t in (("diag", diag), ("line", line)):
            if not isinstance(t, Tensor) or t.ndim != 1:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{self.name}: {arg} must be a 1-d tensor, got {shape}")
        d = line.shape[0]
        if d < 1 or diag.shape[0] != d - 1:
            raise ValueError(
                f"{self.name}: need diag (d - 1,) and line (d,) with d >= 1, got diag "
                f"{tuple(diag.shape)}, line {tuple(line.shape)}"
            )
        if diag.dtype != line.dtype or diag.device != line.device:
            raise ValueError(f"{self.name}: diag and line must share dtype and device")
        self.dim = d
        p = self._p(d)
        data = line.new_empty(2, d)
        rest = data[0, 1:] if self.at_first else data[0, :-1]
        rest.copy_(diag)
        data[0, p] = line[p]
        data[1].copy_(line)
        data[1, p] = 0
        self.data = data

    @classmethod
    def _p(cls, dim: int) -> int:
        """The index of the line."""
        return 0 if cls.at_first else dim - 1

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        return ((2, dim),)

    def _validate(self, *tensors: Tensor) -> None:
        """The base class checks, and that the pad entry ``data[1, p]`` is zero."""
        super()._validate(*tensors)
        if self.data[1, self._p(self.dim)] != 0:
            raise ValueError(f"{self.name}: data[1, {self._p(self.dim)}] (the pad) must be 0")

    def numel(self) -> int:
        """Number of free entries (the pad excluded)."""
        return 2 * self.dim - 1

    # ------------------------------------------------------------------ parts
    @property
    def diag(self) -> Tensor:
        """The diagonal entries off the line, ``(dim - 1,)`` (a view)."""
        return self.data[0, 1:] if self.at_first else self.data[0, :-1]

    @property
    def line(self) -> Tensor:
        """The row or column with its corner entry, ``(dim,)`` (a new tensor)."""
        out = self.data[1].clone()
        p = self._p(self.dim)
        out[p] = self.data[0, p]
        return out

    # ------------------------------------------------------------------ Pi
    @classmethod
    def _project(cls, data: Tensor) -> DiagonalLine:
        """Pi from a fresh ``(2, d)`` tensor holding ``diag(M)`` and row ``p`` of a symmetric
        ``M``: the line's off-diagonal entries are one-sided, so they are doubled."""
        d = data.shape[1]
        data[1].mul_(2)
        data[1, cls._p(d)] = 0
        return cls._wrap(d, data)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> DiagonalLine:
        p = cls._p(mat.shape[0])
        line = mat[p] if cls.by_row else mat[:, p]  # the pattern's side
        return cls._project(torch.stack([mat.diagonal(), line]))

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        out = torch.diag(self.data[0])
        p = self._p(self.dim)
        (out[p] if self.by_row else out[:, p]).add_(self.data[1])
        return out

    def diag_add_(self, value: Scalar) -> DiagonalLine:
        self.data[0].add_(value)
        return self

    def trace(self) -> Tensor:
        return self.data[0].sum()

    def _matmul(self, other: DiagonalLine) -> DiagonalLine:
        (d1, u1), (d2, u2) = self.data, other.data
        p = self._p(self.dim)
        out = torch.empty_like(self.data)
        torch.mul(d1, d2, out=out[0])
        if self.by_row:  # u = D' u + delta_p u'
            torch.mul(u1, d2, out=out[1])
            out[1].addcmul_(u2, d1[p])
        else:  # u = D u' + delta'_p u
            torch.mul(u2, d1, out=out[1])
            out[1].addcmul_(u1, d2[p])
        return self._wrap(self.dim, out)

    def _apply(self, X: Tensor, line_is_row: bool) -> Tensor:
        """``(D + e_p u^T) X`` (``line_is_row``) or ``(D + u e_p^T) X`` for a 2-d ``X``."""
        delta, u = self.data
        out = delta.unsqueeze(1) * X
        p = self._p(self.dim)
        if line_is_row:
            out[p].add_(u @ X)
        else:
            out.addr_(u, X[p])
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, self.by_row)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(X, not self.by_row)  # the transpose swaps row and column

    def _from_inner(self, X: Tensor) -> DiagonalLine:
        # M = Y Y^T with Y = S^T X: its diagonal and its row p
        Y = self._rmatmat(X)
        p = self._p(self.dim)
        out = torch.empty_like(self.data)
        torch.sum(Y * Y, 1, out=out[0])
        torch.mv(Y, Y[p], out=out[1])
        return self._project(out)

    def _from_inner_eye(self) -> DiagonalLine:
        # M = S^T S, column by column of S. Row form: columns delta_j e_j + u_j e_p, so
        # diag(M) = delta^2 + u^2 and M[p, j] = delta_p u_j (j != p). Column form: columns
        # delta_j e_j and, at p, delta_p e_p + u, so diag(M) = delta^2 (+ |u|^2 at p) and
        # M[p, j] = delta_j u_j.
        delta, u = self.data
        p = self._p(self.dim)
        out = torch.empty_like(self.data)
        torch.mul(delta, delta, out=out[0])
        if self.by_row:
            out[0].addcmul_(u, u)
            torch.mul(u, delta[p], out=out[1])
        else:
            out[0, p].add_(u.dot(u))
            torch.mul(u, delta, out=out[1])
        return self._project(out)

    def _from_gram(self, A: Tensor) -> DiagonalLine:
        # S^T A S = S^T (S^T A)^T for a symmetric A: two products with S, O(d^2)
        return self._from_dense(self._rmatmat(self._rmatmat(A).T))
