"""The diagonal structure: ``d`` free entries on the diagonal."""

from __future__ import annotations

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix

#: Operand size (elements) up to which ``from_inner`` uses a product-sum (less overhead).
_SMALL = 1 << 16


class Diagonal(StructuredMatrix):
    """A diagonal matrix; stored tensor ``diag`` of shape ``(dim,)``."""

    name = "diagonal"
    _fields = ("diag",)
    diag: Tensor

    def __init__(self, diag: Tensor) -> None:
        """Wrap a ``(dim,)`` tensor of diagonal entries (not copied)."""
        if not isinstance(diag, Tensor) or diag.ndim != 1 or diag.shape[0] < 1:
            shape = tuple(diag.shape) if isinstance(diag, Tensor) else type(diag).__name__
            raise ValueError(f"diagonal: diag must be a 1-d tensor of length >= 1, got {shape}")
        self.dim = diag.shape[0]
        self._validate(diag)

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        return ((dim,),)

    @classmethod
    def _project(cls, diag_of_sym: Tensor) -> Diagonal:
        """Pi for the diagonal pattern: keep the diagonal of the symmetric matrix."""
        return cls._wrap(diag_of_sym.shape[0], diag_of_sym)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> Diagonal:
        return cls._project(mat.diagonal().clone())

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    def diag_add_(self, value: Scalar) -> Diagonal:
        self.diag.add_(value)
        return self

    def trace(self) -> Tensor:
        return self.diag.sum()

    def infinity_vector_norm(self) -> Tensor:
        return self.diag.abs().max()

    def _matmul(self, other: Diagonal) -> Diagonal:
        return self._wrap(self.dim, self.diag * other.diag)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.diag.unsqueeze(1) * X

    _rmatmat = _matmat

    def _from_inner(self, X: Tensor) -> Diagonal:
        # diag(S X X^T S) = s^2 * rowsum(X^2). vector_norm reduces without a (dim, n)
        # temporary (linear time in dim); half precision accumulates in float32. Small X:
        # the plain product-sum has less call overhead.
        if X.dtype not in (torch.float32, torch.float64):
            sq = torch.linalg.vector_norm(X, dim=1, dtype=torch.float32).square_()
            return self._project(sq.mul_(self.diag.square()).to(self.dtype))
        if X.numel() <= _SMALL:
            sq = (X * X).sum(1)
        else:
            sq = torch.linalg.vector_norm(X, dim=1).square_()
        return self._project(sq.mul_(self.diag).mul_(self.diag))

    def _from_inner_eye(self) -> Diagonal:
        return self._project(self.diag.square())


#: The reference package's name for :class:`Diagonal`.
DiagonalMatrix = Diagonal
