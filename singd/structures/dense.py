"""The dense structure: all ``d^2`` entries are free (the reference package's ``DenseMatrix``)."""

from __future__ import annotations

from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix, symmetric_gram


class Dense(StructuredMatrix):
    """A full ``dim x dim`` matrix; stored tensor ``mat`` of shape ``(dim, dim)``."""

    name = "dense"
    _fields = ("mat",)
    mat: Tensor

    def __init__(self, mat: Tensor) -> None:
        """Wrap a ``(dim, dim)`` tensor (not copied)."""
        self._check_square(mat, "mat")
        self.dim = mat.shape[0]
        self._validate(mat)

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        return ((dim, dim),)

    @classmethod
    def _project(cls, sym: Tensor) -> Dense:
        """Pi for the dense pattern: every entry is kept as it is."""
        return cls._wrap(sym.shape[0], sym)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> Dense:
        return cls._project(mat.clone())

    def to_dense(self) -> Tensor:
        return self.mat.clone()

    def _from_gram(self, A: Tensor) -> Dense:
        return self._wrap(self.dim, self.mat.T @ A @ self.mat)

    def diag_add_(self, value: Scalar) -> Dense:
        self.mat.diagonal().add_(value)
        return self

    def trace(self) -> Tensor:
        return self.mat.trace()

    def _matmul(self, other: Dense) -> Dense:
        return self._wrap(self.dim, self.mat @ other.mat)

    def _matmat(self, X: Tensor) -> Tensor:
        return self.mat @ X

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self.mat.T @ X

    def _from_inner(self, X: Tensor) -> Dense:
        return self._project(symmetric_gram(X.T @ self.mat))

    def _from_inner_eye(self) -> Dense:
        return self._project(symmetric_gram(self.mat))


#: The reference package's name for :class:`Dense`.
DenseMatrix = Dense
