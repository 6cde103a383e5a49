"""The block-diagonal family ``block{N}diagonal``: dense ``N x N`` diagonal blocks.

``dim = nb * N + r`` with ``nb = dim // N`` full blocks and a smaller last block of size
``r = dim % N`` (absent when ``r = 0``).

Storage: one tensor ``data`` of shape ``(nb + 1, N, N)`` whose last slice holds the ``r x r``
last block in its top-left corner and zeros elsewhere (the *pad*); ``(nb, N, N)`` when
``r = 0`` and ``(1, r, r)`` when ``nb = 0``. The pad stays zero under every operation
(products of zero-padded blocks are zero-padded while the entries are finite: an Inf in the
last block turns its pad into NaN, which stays inside that block; ``diag_add_`` skips the
pad; code that writes into ``_tensors()``, e.g. a collective, must keep it zero), so that the
factor algebra of a SINGD step (structured products, scaling, sums, traces) is one torch
call each instead of one per part: at the sizes SINGD meets on a CPU each call costs a few
microseconds whatever its size, more than the flops of the padded block. Products with
dense matrices do not pad (their flops grow with the number of columns): one batched
product over the full blocks and one over the last block. ``blocks`` and ``last`` (the
``to_dict`` keys) are views of ``data``.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix, view_setter

#: Transposed operands with fewer columns than this take the row form (see ``_apply``).
_ROWS_BELOW = 16


def _scalar(value: float, dtype: torch.dtype) -> Tensor:
    """``value`` as a cached 0-dim CPU tensor in the computation precision of ``dtype``.

    ``t.mul_(x)`` / ``t.div_(x)`` with a Python number wrap it into a tensor on every call
    (an overhead comparable to the op itself at these sizes); a CPU scalar tensor is
    read the same way (in float32 for 16-bit and float32 tensors, float64 for float64), so
    the results are identical.
    """
    return _scalar_tensor(value, torch.float64 if dtype == torch.float64 else torch.float32)


@functools.lru_cache(maxsize=256)  # e.g. a schedule of values: the oldest go
def _scalar_tensor(value: float, dtype: torch.dtype) -> Tensor:
    """A 0-dim CPU tensor holding ``value`` (shared: only ever read)."""
    return torch.tensor(value, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _diag_mask_of(nb: int, N: int, r: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(nb + 1, N)``: ones on the diagonals of the padded storage, zeros on the pad."""
    mask = torch.ones(nb + 1, N, dtype=dtype, device=device)
    mask[nb, r:] = 0
    return mask


class BlockDiagonal(StructuredMatrix):
    """Block-diagonal matrix; ``blocks`` ``(dim // N, N, N)`` and ``last`` ``(r, r)`` are
    views of one zero-padded tensor ``data`` (see the module docstring).

    Concrete classes come from ``structure("block{N}diagonal")``, which binds ``N``, or from a
    subclass that sets ``N`` or the reference package's ``BLOCK_DIM`` (the class attribute of
    its ``BlockDiagonalMatrixTemplate``), e.g. ``class B3(BlockDiagonal): BLOCK_DIM = 3``.
    """

    N: ClassVar[int] = 0
    #: The reference package's name for ``N``.
    BLOCK_DIM: ClassVar[int] = 0
    _fields = ("blocks", "last")
    _data: Tensor | None

    def __init_subclass__(cls, **kwargs) -> None:
        """Bind the block size of a subclass that sets ``N`` or ``BLOCK_DIM``, and name it."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "BLOCK_DIM" in own and "N" not in own:
            cls.N = cls.BLOCK_DIM
        N = cls.N
        if isinstance(N, bool) or not isinstance(N, int) or N < 0:
            raise ValueError(f"{cls.__name__}: block size must be an int >= 1, got {N!r}")
        cls.BLOCK_DIM = N
        if N and ("N" in own or "BLOCK_DIM" in own) and "name" not in own:
            cls.name = f"block{N}diagonal"

    def __init__(self, blocks: Tensor, last: Tensor) -> None:
        """Build from the full blocks ``(nb, N, N)`` and the last block ``(dim % N, dim % N)``
        (copied into the padded storage)."""
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

    def _validate(self, *tensors: Tensor) -> None:
        """Check ``blocks`` and ``last`` (base class rules) and copy them into ``data``."""
        self._parts: dict[str, Tensor] = {}
        try:
            super()._validate(*tensors)  # the setters below collect into _parts
            p = self._parts
        finally:
            del self._parts
        self._data = self._pack(self.dim, p["blocks"], p["last"])

    @classmethod
    def _pack(cls, dim: int, blocks: Tensor | None, last: Tensor | None) -> Tensor:
        """The padded storage holding copies of ``blocks`` and ``last`` (None: absent)."""
        nb, r = divmod(dim, cls.N)
        if r == 0:
            return blocks.clone(memory_format=torch.contiguous_format)
        if nb == 0:
            return last.unsqueeze(0).clone(memory_format=torch.contiguous_format)
        data = blocks.new_zeros(nb + 1, cls.N, cls.N)
        data[:nb] = blocks
        data[nb, :r, :r] = last
        return data

    # ------------------------------------------------------------------ blocks as views

    @property
    def data(self) -> Tensor:
        """The padded storage (packed here, once, for an instance made from separate parts)."""
        data = self._data
        if data is None:
            full, last = self._v
            data = self._data = self._pack(self.dim, full, last)
            self._v = None  # views of data from now on
            self.__dict__.pop("_vt", None)
        return data

    def _views(self) -> tuple[Tensor | None, Tensor | None]:
        """The full blocks ``(nb, N, N)`` and the last block ``(r, r)`` as views of ``data``
        (None where absent); made once per instance (``data`` is never reassigned), or the
        separate parts of an instance not packed yet."""
        views = self.__dict__.get("_v")
        if views is None:
            nb, r = divmod(self.dim, self.N)
            data = self.data
            if nb == 0:
                views = (None, data[0])
            elif r == 0:
                views = (data, None)
            else:  # as_strided: a third of the cost of data[nb, :r, :r]
                s0, s1, s2 = data.stride()
                offset = data.storage_offset() + nb * s0
                views = (data[:nb], data.as_strided((r, r), (s1, s2), offset))
            self._v = views
        return views

    def _views_t(self) -> tuple[Tensor | None, Tensor | None]:
        """:meth:`_views` of ``S^T`` (transposed views), made once per instance."""
        views = self.__dict__.get("_vt")
        if views is None:
            full, last = self._views()
            views = (
                None if full is None else full.transpose(1, 2),
                None if last is None else last.T,
            )
            self._vt = views
        return views

    def _get_blocks(self) -> Tensor:
        full = self._views()[0]
        return self._any().new_empty(0, self.N, self.N) if full is None else full

    def _get_last(self) -> Tensor:
        last = self._views()[1]
        return self._any().new_empty(0, 0) if last is None else last

    _set = "the stored data"
    blocks = property(_get_blocks, view_setter("blocks", _set), doc="The full blocks (a view).")
    last = property(_get_last, view_setter("last", _set), doc="The last block (a view).")
    del _set

    def _tensors(self) -> list[Tensor]:
        """The stored tensor ``[data]`` (the pad included: it is zero)."""
        return [self.data]

    def numel(self) -> int:
        """Number of stored (free) entries (the pad excluded)."""
        nb, r = divmod(self.dim, self.N)
        return nb * self.N * self.N + r * r

    @classmethod
    def _wrap(cls, dim: int, *tensors: Tensor) -> BlockDiagonal:
        """An instance on the padded ``data`` (one tensor) or on ``blocks`` and ``last`` (two
        tensors, packed into the padded storage only when an operation needs it: products
        with dense matrices do not); no copies, no validation."""
        obj = cls.__new__(cls)
        obj.dim = dim
        if len(tensors) == 1:
            obj._data = tensors[0]
        else:
            blocks, last = tensors
            obj._data = None
            obj._v = (blocks if blocks.shape[0] else None, last if last.shape[0] else None)
        return obj

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored tensors."""
        return self._any().dtype

    @property
    def device(self) -> torch.device:
        """The device of the stored tensors."""
        return self._any().device

    def _any(self) -> Tensor:
        """A stored tensor (without packing)."""
        if self._data is not None:
            return self._data
        full, last = self._v
        return last if full is None else full

    @classmethod
    def _storage_shapes(cls, dim: int) -> tuple[tuple[int, int, int]]:
        """The shape of the padded storage for ``dim``."""
        nb, r = divmod(dim, cls.N)
        if nb == 0:
            return ((1, r, r),)
        return ((nb + (r > 0), cls.N, cls.N),)

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        nb, r = divmod(dim, cls.N)
        return ((nb, cls.N, cls.N), (r, r))

    # ------------------------------------------------------------------ Pi
    @classmethod
    def _project(cls, dim: int, data: Tensor) -> BlockDiagonal:
        """Pi for a block-diagonal pattern: keep the diagonal blocks (``data``: the padded
        diagonal blocks of the symmetric matrix, zero pad)."""
        return cls._wrap(dim, data)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> BlockDiagonal:
        dim = mat.shape[0]
        nb, r = divmod(dim, cls.N)
        cut = nb * cls.N
        # (nb, N, nb, N) view; its block diagonal is (N, N, nb).
        full = mat[:cut, :cut].reshape(nb, cls.N, nb, cls.N).diagonal(dim1=0, dim2=2)
        return cls._project(dim, cls._pack(dim, full.permute(2, 0, 1), mat[cut:, cut:]))

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        full, last = self._views()
        if full is None:
            return last.clone(memory_format=torch.contiguous_format)
        dim, N = self.dim, self.N
        nb = full.shape[0]
        out = full.new_zeros(dim, dim)
        # the diagonal blocks of out as one (nb, N, N) view, the last block as another
        out.as_strided((nb, N, N), (N * dim + N, dim, 1)).copy_(full)
        if last is not None:
            cut = nb * N
            r = dim - cut
            out.as_strided((r, r), (dim, 1), cut * dim + cut).copy_(last)
        return out

    def _diag_mask(self) -> Tensor | None:
        """Ones on the diagonals of ``data``, zeros on the pad (None when there is no pad)."""
        nb, r = divmod(self.dim, self.N)
        if nb == 0 or r == 0:
            return None
        data = self.data
        return _diag_mask_of(nb, self.N, r, data.dtype, data.device)

    def diag_add_(self, value: Scalar) -> BlockDiagonal:
        diag = self.data.diagonal(dim1=1, dim2=2)
        mask = self._diag_mask()
        if mask is None:
            diag.add_(value)
        elif isinstance(value, Tensor):
            diag.addcmul_(mask, value)
        else:
            diag.add_(mask, alpha=value)
        return self

    def trace(self) -> Tensor:
        return self.data.diagonal(dim1=1, dim2=2).sum()

    def mul_(self, value: Scalar) -> BlockDiagonal:
        """In place ``self *= value`` for a scalar (Python number or 0-dim tensor)."""
        if isinstance(value, Tensor):
            if value.ndim != 0:
                raise ValueError(
                    f"{self.name}.mul_: value must be a scalar, got {tuple(value.shape)}"
                )
            self.data.mul_(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            data = self.data
            data.mul_(_scalar(float(value), data.dtype))
        else:
            return super().mul_(value)  # its errors for anything else
        return self

    def _matmul(self, other: BlockDiagonal) -> BlockDiagonal:
        return self._wrap(self.dim, torch.bmm(self.data, other.data))

    def gram_blocks(self) -> BlockDiagonal:
        """``S S^T`` (block-diagonal again): one batched product."""
        return self._wrap(self.dim, torch.bmm(self.data, self.data.transpose(1, 2)))

    # ------------------------------------------------------------------ dense products
    def _cols(self, X: Tensor, transpose: bool) -> Tensor:
        """``S X`` or ``S^T X`` for a contiguous 2-d ``X`` (views by ``as_strided``: one
        call each where indexing takes two or three)."""
        full, last = self._views_t() if transpose else self._views()
        if full is None:
            return last @ X
        nb, N, n = full.shape[0], self.N, X.shape[1]
        if last is None:
            return torch.bmm(full, X.view(nb, N, n)).view(self.dim, n)
        cut = nb * N
        out = torch.empty_like(X)
        shape, strides = (nb, N, n), (N * n, n, 1)
        torch.bmm(full, X.as_strided(shape, strides), out=out.as_strided(shape, strides))
        torch.mm(last, X[cut:], out=out[cut:])
        return out

    def _rows(self, R: Tensor, transpose: bool) -> Tensor:
        """``R S`` or ``R S^T`` for ``R`` of shape ``(n, dim)`` with unit column stride."""
        full, last = self._views_t() if transpose else self._views()
        if full is None:
            return R @ last
        nb, N, n, dim = full.shape[0], self.N, R.shape[0], self.dim
        cut = nb * N
        rs, off = R.stride(0), R.storage_offset()
        # (nb, n, N) products, written back into the (n, dim) layout by one copy
        Y = torch.bmm(R.as_strided((nb, n, N), (N, rs, 1), off), full)
        if last is None:
            return Y.transpose(0, 1).reshape(n, cut)
        out = R.new_empty((n, dim))
        out.as_strided((nb, n, N), (N, dim, 1)).copy_(Y)
        r = dim - cut
        torch.mm(
            R.as_strided((n, r), (rs, 1), off + cut),
            last,
            out=out.as_strided((n, r), (dim, 1), cut),
        )
        return out

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        """``S X`` (``transpose``: ``S^T X``): the row form ``(X^T S^T)^T`` for a transposed
        ``X`` with fewer than 16 columns (no copy of ``X``, and wide block products instead
        of thin ones), else the column form (measured, one thread: the row form's write-back
        copy costs more than it saves from 16 columns up, even against copying ``X``)."""
        if X.stride(0) == 1 and 1 < X.shape[1] < _ROWS_BELOW and X.stride(1) == self.dim:
            return self._rows(X.T, not transpose).T
        return self._cols(X.contiguous(), transpose)

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=True)

    # ------------------------------------------------------------------ statistics
    def _from_inner(self, X: Tensor) -> BlockDiagonal:
        full, last = self._views()
        data, dim, N, n = self.data, self.dim, self.N, X.shape[1]
        if full is None:  # one (r, r) block: L^T (X X^T) L
            return self._project(dim, (last.T @ (X @ X.T) @ last).unsqueeze(0))
        nb = full.shape[0]
        cut = nb * N
        if n >= N:
            # Pi(S^T X X^T S) needs only the diagonal blocks A_i = X_i X_i^T of X X^T, then
            # S_i^T A_i S_i: half the flops of forming S^T X first, and no copy of X
            Xb = X[:cut].view(nb, N, n)
            if last is None:
                A = torch.bmm(Xb, Xb.transpose(1, 2))
            else:  # zero-padded like data (a NaN-free pad: it meets the pad zeros of S)
                A = torch.zeros_like(data)  # contiguous, like every data tensor made here
                torch.bmm(Xb, Xb.transpose(1, 2), out=A[:nb])
                Xl = X[cut:]
                r = dim - cut
                torch.mm(Xl, Xl.T, out=A.as_strided((r, r), (N, 1), nb * N * N))
            return self._project(dim, torch.bmm(data.transpose(1, 2), torch.bmm(A, data)))
        # few columns: Y = S^T X (by rows: Z = X^T S), then the diagonal blocks of Y Y^T
        Z = self._rows(X.T, False) if X.stride(0) == 1 else self._cols(X.contiguous(), True).T
        Zb = Z[:, :cut].unflatten(1, (nb, N)).transpose(0, 1)  # (nb, n, N)
        if last is None:
            return self._project(dim, torch.bmm(Zb.transpose(1, 2), Zb))
        out = torch.zeros_like(data)
        torch.bmm(Zb.transpose(1, 2), Zb, out=out[:nb])
        Zl = Z[:, cut:]
        r = dim - cut
        torch.mm(Zl.T, Zl, out=out.as_strided((r, r), (N, 1), nb * N * N))
        return self._project(dim, out)

    def _from_gram(self, A: Tensor) -> BlockDiagonal:
        """``Pi(S^T A S)`` for a symmetric ``A`` of shape ``(dim, dim)`` (e.g. ``A = X^T X``
        formed once for many rows): only the diagonal blocks of ``A`` are read."""
        full, last = self._views()
        data, dim, N = self.data, self.dim, self.N
        if full is None:
            return self._project(dim, (last.T @ A @ last).unsqueeze(0))
        nb = full.shape[0]
        cut = nb * N
        s0, s1 = A.stride()
        off = A.storage_offset()
        Ab = A.as_strided((nb, N, N), (N * (s0 + s1), s0, s1), off)  # diagonal blocks
        if last is None:
            return self._project(dim, torch.bmm(data.transpose(1, 2), torch.bmm(Ab, data)))
        Ap = torch.zeros_like(data)  # zero-padded like data
        Ap[:nb].copy_(Ab)
        r = dim - cut
        Ap.as_strided((r, r), (N, 1), nb * N * N).copy_(
            A.as_strided((r, r), (s0, s1), off + cut * (s0 + s1))
        )
        return self._project(dim, torch.bmm(data.transpose(1, 2), torch.bmm(Ap, data)))

    def _from_inner_eye(self) -> BlockDiagonal:
        data = self.data
        return self._project(self.dim, torch.bmm(data.transpose(1, 2), data))


@functools.cache
def block_diagonal_class(N: int) -> type[BlockDiagonal]:
    """The ``block{N}diagonal`` class with the block size bound, one per ``N`` (the registry's
    ``structure("block{N}diagonal")``)."""
    if N < 1:
        raise ValueError(f"block size N must be >= 1, got {N}")
    attrs = {"name": f"block{N}diagonal", "N": N, "__module__": __name__}
    return type(f"Block{N}Diagonal", (BlockDiagonal,), attrs)


#: The reference package's names: its template (subclasses set ``BLOCK_DIM``) and its
#: ``block30diagonal`` class (the registry's class, so ``isinstance`` checks agree).
BlockDiagonalMatrixTemplate = BlockDiagonal
Block30DiagonalMatrix = block_diagonal_class(30)
