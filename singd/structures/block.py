"""The block-diagonal family ``block{N}diagonal``: dense ``N x N`` diagonal blocks.

``dim = nb * N + r`` with ``nb = dim // N`` full blocks and a smaller last block of size
``r = dim % N`` (absent when ``r = 0``). The full blocks live in one ``(nb, N, N)`` tensor so
that every product is one batched ``bmm`` plus one small ``mm`` for the last block.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix


class BlockDiagonal(StructuredMatrix):
    """Block-diagonal matrix; stored ``blocks`` ``(dim // N, N, N)`` and ``last`` ``(r, r)``.

    Concrete classes come from ``structure("block{N}diagonal")``, which binds ``N``.
    """

    N: ClassVar[int] = 0
    _fields = ("blocks", "last")
    blocks: Tensor
    last: Tensor

    def __init__(self, blocks: Tensor, last: Tensor) -> None:
        """Wrap the full blocks ``(nb, N, N)`` and the last block ``(dim % N, dim % N)``."""
        self._check_concrete()
        for arg, t, nd in (("blocks", blocks, 3), ("last", last, 2)):
            if not isinstance(t, Tensor) or t.ndim != nd:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{self.name}: {arg} must be a {nd}-d tensor, got {shape}")
        self.dim = blocks.shape[0] * self.N + last.shape[0]
        if self.dim < 1 or last.shape[0] >= max(self.N, 1):
            raise ValueError(
                f"{self.name}: need blocks (nb, {self.N}, {self.N}) and last (r, r) with "
                f"r < {self.N} and nb * {self.N} + r >= 1, got blocks {tuple(blocks.shape)}, "
                f"last {tuple(last.shape)}"
            )
        self._validate(blocks, last)

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        nb, r = divmod(dim, cls.N)
        return ((nb, cls.N, cls.N), (r, r))

    # ------------------------------------------------------------------ Pi
    @classmethod
    def _project(cls, dim: int, blocks: Tensor, last: Tensor) -> BlockDiagonal:
        """Pi for a block-diagonal pattern: keep the diagonal blocks of the symmetric matrix."""
        return cls._wrap(dim, blocks, last)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> BlockDiagonal:
        dim = mat.shape[0]
        nb, _ = divmod(dim, cls.N)
        cut = nb * cls.N
        # (nb, N, nb, N) view; its block diagonal is (N, N, nb).
        full = mat[:cut, :cut].reshape(nb, cls.N, nb, cls.N).diagonal(dim1=0, dim2=2)
        return cls._project(dim, full.permute(2, 0, 1).clone(), mat[cut:, cut:].clone())

    # ------------------------------------------------------------------ helpers
    @property
    def _cut(self) -> int:
        """Rows covered by the full blocks."""
        return self.blocks.shape[0] * self.N

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        """``S X`` or ``S^T X`` for a 2-d ``X``: one bmm over the full blocks, one mm."""
        nb, N = self.blocks.shape[0], self.N
        cut = nb * N
        blocks = self.blocks.transpose(1, 2) if transpose else self.blocks
        last = self.last.T if transpose else self.last
        n = X.shape[1]
        if cut == self.dim:
            return torch.bmm(blocks, X.reshape(nb, N, n)).reshape(self.dim, n)
        if cut == 0:
            return last @ X
        out = X.new_empty(X.shape)
        torch.bmm(blocks, X[:cut].reshape(nb, N, n), out=out[:cut].view(nb, N, n))
        torch.mm(last, X[cut:], out=out[cut:])
        return out

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks.unbind(0), self.last)

    def diag_add_(self, value: Scalar) -> BlockDiagonal:
        self.blocks.diagonal(dim1=1, dim2=2).add_(value)
        self.last.diagonal().add_(value)
        return self

    def average_trace(self) -> Tensor:
        total = self.blocks.diagonal(dim1=1, dim2=2).sum() + self.last.diagonal().sum()
        return total / self.dim

    def _matmul(self, other: BlockDiagonal) -> BlockDiagonal:
        return self._wrap(self.dim, torch.bmm(self.blocks, other.blocks), self.last @ other.last)

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply(X.contiguous(), transpose=False)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(X.contiguous(), transpose=True)

    def _from_inner(self, X: Tensor) -> BlockDiagonal:
        nb, N, cut = self.blocks.shape[0], self.N, self._cut
        n = X.shape[1]
        if n >= N:
            # Pi(S^T X X^T S) needs only the diagonal blocks A_i = X_i X_i^T of X X^T, then
            # S_i^T A_i S_i: half the flops of forming S^T X first, and no copy of X
            Xb, Xl = X[:cut].reshape(nb, N, n), X[cut:]
            A = torch.bmm(Xb, Xb.transpose(1, 2))
            blocks = torch.bmm(self.blocks.transpose(1, 2), torch.bmm(A, self.blocks))
            return self._project(self.dim, blocks, self.last.T @ (Xl @ Xl.T) @ self.last)
        Y = self._apply(X.contiguous(), transpose=True)
        Yb = Y[:cut].reshape(nb, N, n)
        Yl = Y[cut:]
        return self._project(self.dim, torch.bmm(Yb, Yb.transpose(1, 2)), Yl @ Yl.T)

    def _from_inner_eye(self) -> BlockDiagonal:
        blocks, last = self.blocks, self.last
        return self._project(self.dim, torch.bmm(blocks.transpose(1, 2), blocks), last.T @ last)


def block_diagonal_class(N: int) -> type[BlockDiagonal]:
    """A new ``block{N}diagonal`` class with the block size bound (use ``structure`` instead)."""
    if N < 1:
        raise ValueError(f"block size N must be >= 1, got {N}")
    attrs = {"name": f"block{N}diagonal", "N": N, "__module__": __name__}
    return type(f"Block{N}Diagonal", (BlockDiagonal,), attrs)
