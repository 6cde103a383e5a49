"""Full triangular structures ``tril`` and ``triu`` (``d (d + 1) / 2`` free entries).

The matrix is kept as a dense ``(d, d)`` tensor whose entries outside the triangle are zero,
so products are plain BLAS calls; ``numel()`` counts the free entries of the pattern.
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

    def average_trace(self) -> Tensor:
        return self.mat.diagonal().mean()

    def _matmul(self, other: Triangular) -> Triangular:
        return self._wrap(self.dim, self._mask_(self.mat @ other.mat))

    def _matmat(self, X: Tensor) -> Tensor:
        return self.mat @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.mat.T @ X

    def _from_inner(self, X: Tensor) -> Triangular:
        return self._project(symmetric_gram(X.T @ self.mat))

    def _from_inner_eye(self) -> Triangular:
        return self._project(symmetric_gram(self.mat))


class Tril(Triangular):
    """Lower triangular matrix."""

    name = "tril"
    lower = True


class Triu(Triangular):
    """Upper triangular matrix."""

    name = "triu"
    lower = False
