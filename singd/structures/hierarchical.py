"""The hierarchical family ``hierarchical{K1}_{K2}``.

With ``k1 = min(K1, d)``, ``m = max(d - K1 - K2, 0)`` and ``k2 = d - k1 - m`` the matrix is::

    [[A, B1, B2],        A  (k1, k1) dense,  B = [B1, B2]  (k1, d - k1) row band
     [0, diag(c), 0],    c  (m,)   diagonal
     [0, D,  E ]]        D  (k2, m) dense,   E  (k2, k2) dense

so ``d <= K1`` is dense and ``K1 < d <= K1 + K2`` has no diagonal part. The pattern is closed
under products; ``B`` and ``D`` are one-sided (their mirror entries are structurally zero), so
``Pi`` doubles them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix


class Hierarchical(StructuredMatrix):
    """Hierarchical matrix; stored ``A`` ``(k1,k1)``, ``B`` ``(k1,d-k1)``, ``c`` ``(m,)``,
    ``D`` ``(k2,m)``, ``E`` ``(k2,k2)`` (see the module docstring).

    Concrete classes come from ``structure("hierarchical{K1}_{K2}")``, which binds K1, K2.
    """

    K1: ClassVar[int] = 0
    K2: ClassVar[int] = 0
    _fields = ("A", "B", "c", "D", "E")
    A: Tensor
    B: Tensor
    c: Tensor
    D: Tensor
    E: Tensor

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor) -> None:
        """Wrap the five stored tensors (not copied); ``dim = A.shape[0] + B.shape[1]``."""
        self._check_concrete()
        if not (isinstance(A, Tensor) and isinstance(B, Tensor)) or A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"{self.name}: A and B must be 2-d tensors")
        self.dim = A.shape[0] + B.shape[1]
        if self.dim < 1:
            raise ValueError(f"{self.name}: dim = A.shape[0] + B.shape[1] must be >= 1")
        self._validate(A, B, c, D, E)

    @classmethod
    def _sizes(cls, dim: int) -> tuple[int, int, int]:
        """``(k1, m, k2)``: sizes of the top, diagonal and bottom parts for ``dim``."""
        k1 = min(cls.K1, dim)
        m = max(dim - cls.K1 - cls.K2, 0)
        return k1, m, dim - k1 - m

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        k1, m, k2 = cls._sizes(dim)
        return ((k1, k1), (k1, dim - k1), (m,), (k2, m), (k2, k2))

    # ------------------------------------------------------------------ Pi
    @classmethod
    def _project(
        cls, dim: int, M00: Tensor, M0r: Tensor, m11: Tensor, M21: Tensor, M22: Tensor
    ) -> Hierarchical:
        """Pi from the parts of a symmetric M: blocks (0,0), (0, 1:), diag(1,1), (2,1), (2,2).

        The row band B and the block D are one-sided, so they get twice M's entries.
        Fresh tensors ``M0r`` and ``M21`` are doubled in place.
        """
        return cls._wrap(dim, M00, M0r.mul_(2), m11, M21.mul_(2), M22)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> Hierarchical:
        k1, m, _ = cls._sizes(mat.shape[0])
        j = k1 + m
        return cls._project(
            mat.shape[0],
            mat[:k1, :k1].clone(),
            mat[:k1, k1:].clone(),
            mat[k1:j, k1:j].diagonal().clone(),
            mat[j:, k1:j].clone(),
            mat[j:, j:].clone(),
        )

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        k1, m, _ = self._sizes(self.dim)
        j = k1 + m
        out = self.A.new_zeros(self.dim, self.dim)
        out[:k1, :k1] = self.A
        out[:k1, k1:] = self.B
        out[k1:j, k1:j] = torch.diag(self.c)
        out[j:, k1:j] = self.D
        out[j:, j:] = self.E
        return out

    def diag_add_(self, value: Scalar) -> Hierarchical:
        self.A.diagonal().add_(value)
        self.c.add_(value)
        self.E.diagonal().add_(value)
        return self

    def average_trace(self) -> Tensor:
        total = self.A.diagonal().sum() + self.c.sum() + self.E.diagonal().sum()
        return total / self.dim

    def _matmul(self, other: Hierarchical) -> Hierarchical:
        k1, m, _ = self._sizes(self.dim)
        A, B, c, D, E = self.A, self.B, self.c, self.D, self.E
        A2, B2, c2, D2, E2 = other.A, other.B, other.c, other.D, other.E
        # B'' = A B' + [B1 diag(c') + B2 D', B2 E']
        Bn = A @ B2
        Bn[:, :m].addcmul_(B[:, :m], c2.unsqueeze(0)).addmm_(B[:, m:], D2)
        Bn[:, m:].addmm_(B[:, m:], E2)
        Dn = torch.addmm(D * c2.unsqueeze(0), E, D2)
        return self._wrap(self.dim, A @ A2, Bn, c * c2, Dn, E @ E2)

    def _matmat(self, X: Tensor) -> Tensor:
        k1, m, _ = self._sizes(self.dim)
        j = k1 + m
        out = X.new_empty(X.shape)
        torch.addmm(self.A @ X[:k1], self.B, X[k1:], out=out[:k1])
        torch.mul(self.c.unsqueeze(1), X[k1:j], out=out[k1:j])
        torch.addmm(self.E @ X[j:], self.D, X[k1:j], out=out[j:])
        return out

    def _rmatmat(self, X: Tensor) -> Tensor:
        k1, m, _ = self._sizes(self.dim)
        j = k1 + m
        out = X.new_empty(X.shape)
        torch.mm(self.A.T, X[:k1], out=out[:k1])
        torch.mm(self.B.T, X[:k1], out=out[k1:])
        out[k1:j].addcmul_(self.c.unsqueeze(1), X[k1:j]).addmm_(self.D.T, X[j:])
        out[j:].addmm_(self.E.T, X[j:])
        return out

    def _from_inner(self, X: Tensor) -> Hierarchical:
        k1, m, _ = self._sizes(self.dim)
        j = k1 + m
        Y = self._rmatmat(X)
        Y0, Y1, Y2 = Y[:k1], Y[k1:j], Y[j:]
        return self._project(
            self.dim,
            Y0 @ Y0.T,
            Y0 @ Y[k1:].T,
            (Y1 * Y1).sum(1),
            Y2 @ Y1.T,
            Y2 @ Y2.T,
        )

    def _from_inner_eye(self) -> Hierarchical:
        # S^T has row blocks [A^T, 0, 0], [B1^T, diag(c), D^T], [B2^T, 0, E^T].
        _, m, _ = self._sizes(self.dim)
        A, B, c, D, E = self.A, self.B, self.c, self.D, self.E
        B1, B2 = B[:, :m], B[:, m:]
        m11 = (B1 * B1).sum(0) + c * c + (D * D).sum(0)
        M21 = torch.addmm(B2.T @ B1, E.T, D)
        M22 = torch.addmm(B2.T @ B2, E.T, E)
        return self._project(self.dim, A.T @ A, A.T @ B, m11, M21, M22)


def hierarchical_class(K1: int, K2: int) -> type[Hierarchical]:
    """A new ``hierarchical{K1}_{K2}`` class with K1, K2 bound (use ``structure`` instead)."""
    if K1 < 1 or K2 < 1:
        raise ValueError(f"hierarchical K1 and K2 must be >= 1, got K1={K1}, K2={K2}")
    return type(
        f"Hierarchical{K1}_{K2}",
        (Hierarchical,),
        {"name": f"hierarchical{K1}_{K2}", "K1": K1, "K2": K2, "__module__": __name__},
    )
