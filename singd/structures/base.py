"""The interface every structured matrix implements, and the generic parts of it.

A structured matrix ``S`` of size ``dim x dim`` keeps only the free entries of its sparsity
pattern in a few tensors (its *stored tensors*, named by the class attribute ``_fields``).
Subclasses implement the structure-specific math (products, the projection ``Pi``); this base
class implements everything that is the same for all of them: in-place arithmetic on the
stored tensors, dtype/device moves, norms, ``state_dict`` conversion and input validation.

Conventions:

* ``cls.from_dense(M)`` is SINGD's projection ``Pi`` (docs/architecture.md, 'singd: the
  optimizer') for a *symmetric* ``M``
  (entries outside the pattern are dropped, one-sided entries of a triangular pattern are
  doubled, tied entries are averaged). Each structure writes ``Pi`` once, as a classmethod
  ``_project`` taking the parts of ``M`` it needs; ``from_dense``, ``from_inner(X)`` and
  ``from_inner()`` only differ in how they compute those parts.
* ``S.from_inner(X)`` is ``Pi(S^T X X^T S)`` computed from ``Y = S^T X`` without forming
  ``Y Y^T`` where the structure is sparse; ``S.from_gram(A)`` is ``Pi(S^T A S)`` for a
  symmetric ``A`` (e.g. ``X X^T`` formed once for many rows), by the dense form unless a
  structure has a cheaper route.
* Operands must have the same dtype as ``S`` (a ``ValueError`` says so): products never
  change precision silently.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor

Scalar = float | int | Tensor


class StructuredMatrix(ABC):
    """A square matrix stored by the free entries of a sparsity pattern closed under products."""

    #: Canonical structure name, e.g. ``"diagonal"`` or ``"hierarchical15_15"``.
    name: ClassVar[str] = ""
    #: Attribute names of the stored tensors, in ``to_dict`` order.
    _fields: ClassVar[tuple[str, ...]] = ()

    dim: int

    # ------------------------------------------------------------------ construction
    @classmethod
    @abstractmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of the stored tensors, in ``_fields`` order, for a matrix of size ``dim``."""

    @classmethod
    def _storage_shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of the tensors `_wrap` takes (the stored fields' `_shapes` unless a
        structure packs its fields into other storage)."""
        return cls._shapes(dim)

    @classmethod
    def _wrap(cls, dim: int, *tensors: Tensor) -> StructuredMatrix:
        """Build an instance from stored tensors without validation (internal fast path)."""
        obj = cls.__new__(cls)
        obj.dim = dim
        for field, tensor in zip(cls._fields, tensors):
            setattr(obj, field, tensor)
        return obj

    @classmethod
    def _check_concrete(cls) -> None:
        """Raise unless this is a concrete structure (parametric families are not)."""
        if not cls.name:
            raise TypeError(
                f"{cls.__name__} is a family, not a structure: get a concrete class "
                "with singd.structures.structure(name), e.g. structure('block30diagonal')"
            )

    def _validate(self, *tensors: Tensor) -> None:
        """Check the stored tensors against ``_shapes(self.dim)`` and set them as attributes."""
        self._check_concrete()
        for tensor, field in zip(tensors, self._fields):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{self.name}: stored tensor {field!r} must be a torch.Tensor")
        expected = self._shapes(self.dim)
        got = tuple(tuple(t.shape) for t in tensors)
        if got != expected:
            named = ", ".join(f"{f}={tuple(s)}" for f, s in zip(self._fields, got))
            want = ", ".join(f"{f}={tuple(s)}" for f, s in zip(self._fields, expected))
            raise ValueError(
                f"{self.name} of dim {self.dim}: stored tensors have shapes {named}, "
                f"expected {want}"
            )
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"{self.name}: stored tensors mix dtypes {dtypes} / devices {devices}")
        for field, tensor in zip(self._fields, tensors):
            setattr(self, field, tensor)

    @staticmethod
    def _check_dim(dim: int) -> int:
        """Validate a matrix size argument."""
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int >= 1, got {dim!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        return dim

    @classmethod
    def zeros(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> StructuredMatrix:
        """The zero matrix of size ``dim`` in this structure."""
        cls._check_concrete()
        dim = cls._check_dim(dim)
        tensors = [torch.zeros(s, dtype=dtype, device=device) for s in cls._storage_shapes(dim)]
        return cls._wrap(dim, *tensors)

    @classmethod
    def eye(
        cls, dim: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> StructuredMatrix:
        """The identity matrix of size ``dim`` in this structure."""
        return cls.zeros(dim, dtype=dtype, device=device).diag_add_(1.0)

    @classmethod
    def from_dense(cls, sym_mat: Tensor) -> StructuredMatrix:
        """The projection ``Pi(sym_mat)`` onto this structure (``sym_mat`` symmetric, d x d)."""
        cls._check_square(sym_mat, "sym_mat")
        return cls._from_dense(sym_mat)

    @classmethod
    @abstractmethod
    def _from_dense(cls, mat: Tensor) -> StructuredMatrix:
        """``Pi(mat)`` for a validated square tensor."""

    @classmethod
    def _check_square(cls, mat: Tensor, arg: str) -> None:
        """Raise unless ``mat`` is a square 2-d tensor of size >= 1."""
        if not isinstance(mat, Tensor):
            raise TypeError(f"{cls.name}: {arg} must be a torch.Tensor, got {type(mat).__name__}")
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] < 1:
            raise ValueError(
                f"{cls.name}: {arg} must be a square matrix (d, d) with d >= 1, "
                f"got shape {tuple(mat.shape)}"
            )

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Tensor]:
        """The stored tensors as a flat dict (for ``state_dict``); ``from_dict`` inverts it.

        The values are the live storage (no copies), like ``torch.optim`` state tensors.
        """
        return {f: getattr(self, f) for f in self._fields}

    @classmethod
    def from_dict(cls, dim: int, tensors: dict[str, Tensor]) -> StructuredMatrix:
        """Rebuild a matrix of size ``dim`` from ``to_dict()`` output (validated)."""
        dim = cls._check_dim(dim)
        if not isinstance(tensors, dict) or set(tensors) != set(cls._fields):
            got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"{cls.name}: from_dict needs keys {list(cls._fields)}, got {got}")
        obj = cls.__new__(cls)
        obj.dim = dim
        obj._validate(*(tensors[f] for f in cls._fields))
        return obj

    def __reduce__(self):
        """Pickle by structure name, so that parametric classes survive ``torch.save``."""
        return (_rebuild, (self.name, self.dim, self.to_dict()))

    def _tensors(self) -> list[Tensor]:
        """The stored tensors in ``_fields`` order."""
        return [getattr(self, f) for f in self._fields]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored tensors."""
        return getattr(self, self._fields[0]).dtype

    @property
    def device(self) -> torch.device:
        """The device of the stored tensors."""
        return getattr(self, self._fields[0]).device

    @property
    def shape(self) -> torch.Size:
        """``(dim, dim)``, like a dense tensor."""
        return torch.Size((self.dim, self.dim))

    def numel(self) -> int:
        """Number of stored (free) entries."""
        return sum(t.numel() for t in self._tensors())

    def clone(self) -> StructuredMatrix:
        """A deep copy."""
        return self._wrap(self.dim, *(t.clone() for t in self._tensors()))

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> StructuredMatrix:
        """A copy in another dtype and/or device (shares storage when nothing changes)."""
        return self._wrap(self.dim, *(t.to(dtype=dtype, device=device) for t in self._tensors()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, dtype={self.dtype})"

    # ------------------------------------------------------------------ in-place arithmetic
    def _check_same(self, other: object, op: str) -> None:
        """Raise unless ``other`` is the same structure class with the same dim."""
        if not isinstance(other, StructuredMatrix):
            raise TypeError(f"{self.name}.{op}: expected a StructuredMatrix, got {type(other)}")
        if type(other) is not type(self):
            raise ValueError(
                f"{op}: cannot combine {self.name} (dim {self.dim}) with {other.name} "
                f"(dim {other.dim}); both operands must have the same structure"
            )
        if other.dim != self.dim:
            raise ValueError(
                f"{self.name}.{op}: shapes ({self.dim}, {self.dim}) and "
                f"({other.dim}, {other.dim}) differ"
            )

    def add_(self, other: StructuredMatrix, alpha: Scalar = 1.0) -> StructuredMatrix:
        """In place ``self += alpha * other`` (same structure and dim); returns ``self``."""
        self._check_same(other, "add_")
        if isinstance(alpha, Tensor):  # torch's alpha= takes numbers only: a += b * alpha
            for a, b in zip(self._tensors(), other._tensors()):
                a.addcmul_(b, alpha)
        else:
            for a, b in zip(self._tensors(), other._tensors()):
                a.add_(b, alpha=alpha)
        return self

    def mul_(self, value: Scalar) -> StructuredMatrix:
        """In place ``self *= value`` for a scalar (Python number or 0-dim tensor); returns self."""
        if isinstance(value, Tensor) and value.ndim != 0:
            raise ValueError(f"{self.name}.mul_: value must be a scalar, got {tuple(value.shape)}")
        if isinstance(value, StructuredMatrix):
            raise TypeError(f"{self.name}.mul_: value must be a scalar; use @ for products")
        for t in self._tensors():
            t.mul_(value)
        return self

    @abstractmethod
    def diag_add_(self, value: Scalar) -> StructuredMatrix:
        """In place ``self += value * I``; returns ``self``."""

    def infinity_vector_norm(self) -> Tensor:
        """``max |entry|`` over the stored entries, as a 0-dim tensor."""
        maxes = [t.abs().max() for t in self._tensors() if t.numel() > 0]
        return maxes[0] if len(maxes) == 1 else torch.stack(maxes).max()

    @abstractmethod
    def trace(self) -> Tensor:
        """``trace(S)`` (the sum of the diagonal) as a 0-dim tensor."""

    def average_trace(self) -> Tensor:
        """``trace(S) / dim`` as a 0-dim tensor (the reference package's name)."""
        return self.trace() / self.dim

    def frobenius_norm(self) -> Tensor:
        """``||S||_F`` as a 0-dim tensor (structures whose stored entries repeat override it)."""
        return torch.stack([t.square().sum() for t in self._tensors()]).sum().sqrt()

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` for each stored tensor, as in the reference package."""
        yield from self.to_dict().items()

    # ------------------------------------------------------------------ out-of-place arithmetic
    def __add__(self, other: StructuredMatrix) -> StructuredMatrix:
        """``S + T`` for ``T`` of the same structure and dim, as a new matrix."""
        if not isinstance(other, StructuredMatrix):
            return NotImplemented
        return self.clone().add_(other)

    def __mul__(self, value: Scalar) -> StructuredMatrix:
        """``S * value`` for a scalar (Python number or 0-dim tensor), as a new matrix."""
        if isinstance(value, StructuredMatrix):
            raise TypeError(f"{self.name}: * takes a scalar; use @ for products")
        if not isinstance(value, (int, float, Tensor)) or isinstance(value, bool):
            return NotImplemented
        return self.clone().mul_(value)

    __rmul__ = __mul__

    # ------------------------------------------------------------------ products
    @abstractmethod
    def to_dense(self) -> Tensor:
        """The dense ``dim x dim`` tensor."""

    def _operand(self, X: Tensor, op: str) -> tuple[Tensor, bool]:
        """Validate a dense right-hand side; return it as 2-d and whether it was a vector."""
        if not isinstance(X, Tensor):
            raise TypeError(f"{self.name}.{op}: X must be a torch.Tensor, got {type(X).__name__}")
        if X.ndim not in (1, 2) or X.shape[0] != self.dim:
            raise ValueError(
                f"{self.name}.{op}: X must have shape ({self.dim}, n) or ({self.dim},) to match "
                f"the matrix shape ({self.dim}, {self.dim}), got {tuple(X.shape)}"
            )
        if X.dtype != self.dtype:
            raise ValueError(
                f"{self.name}.{op}: X has dtype {X.dtype} but the matrix is {self.dtype}; "
                "cast one of them first"
            )
        if X.ndim == 1:
            return X.unsqueeze(1), True
        return X, False

    def __matmul__(self, other: StructuredMatrix | Tensor) -> StructuredMatrix | Tensor:
        """``S @ T`` (same structure -> same structure) or ``S @ X`` (dense -> dense)."""
        if isinstance(other, StructuredMatrix):
            self._check_same(other, "__matmul__")
            return self._matmul(other)
        if isinstance(other, Tensor):
            X, vec = self._operand(other, "__matmul__")
            out = self._matmat(X)
            return out.squeeze(1) if vec else out
        return NotImplemented

    def __rmatmul__(self, other: Tensor) -> Tensor:
        """``X @ S`` for a dense ``X`` of shape ``(n, dim)``, computed as ``(S^T X^T)^T``.

        Python reaches this only after ``Tensor.__matmul__`` has failed, which costs some
        microseconds; hot loops can call ``S.rmatmat(X.T).T`` directly.
        """
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim not in (1, 2) or other.shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}.__rmatmul__: X must have shape (n, {self.dim}) to match the "
                f"matrix shape ({self.dim}, {self.dim}), got {tuple(other.shape)}"
            )
        return self.rmatmat(other.transpose(0, -1)).transpose(0, -1)

    def rmatmat(self, X: Tensor) -> Tensor:
        """``S^T X`` for a dense ``X`` of shape ``(dim, n)`` (or ``(dim,)``)."""
        X, vec = self._operand(X, "rmatmat")
        out = self._rmatmat(X)
        return out.squeeze(1) if vec else out

    def from_inner(self, X: Tensor | None = None) -> StructuredMatrix:
        """``Pi(S^T X X^T S)`` for ``X`` of shape ``(dim, n)``; ``Pi(S^T S)`` when X is None."""
        if X is None:
            return self._from_inner_eye()
        X, _ = self._operand(X, "from_inner")
        return self._from_inner(X)

    @classmethod
    def from_mat_inner(cls, X: Tensor) -> StructuredMatrix:
        """``Pi(X X^T)`` for ``X`` of shape ``(dim, n)``, without forming ``X X^T`` where the
        structure is sparse (the reference package's name)."""
        if not isinstance(X, Tensor) or X.ndim != 2 or X.shape[0] < 1:
            shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
            raise ValueError(f"{cls.name}.from_mat_inner: X must be (dim, n), got {shape}")
        return cls.eye(X.shape[0], dtype=X.dtype, device=X.device).from_inner(X)

    def from_inner2(self, XXT: Tensor) -> StructuredMatrix:
        """``Pi(S^T XXT S)`` for a symmetric ``XXT``: :meth:`from_gram` under the reference
        package's name."""
        return self.from_gram(XXT)

    def from_gram(self, A: Tensor) -> StructuredMatrix:
        """``Pi(S^T A S)`` for a symmetric ``A`` of shape ``(dim, dim)`` in S's dtype (e.g.
        ``A = X^T X`` formed once for many rows: equal to ``from_inner(X^T)``)."""
        self._check_square(A, "A")
        if A.shape[0] != self.dim or A.dtype != self.dtype:
            raise ValueError(
                f"{self.name}.from_gram: A must be ({self.dim}, {self.dim}) of dtype "
                f"{self.dtype}, got {tuple(A.shape)} of dtype {A.dtype}"
            )
        return self._from_gram(A)

    def _from_gram(self, A: Tensor) -> StructuredMatrix:
        """``Pi(S^T A S)`` for a validated ``A`` (here by the dense form; structures with a
        cheaper route override it)."""
        S = self.to_dense()
        return self._from_dense(S.T @ A @ S)

    @abstractmethod
    def _matmul(self, other: StructuredMatrix) -> StructuredMatrix:
        """``S @ T`` for a validated operand of the same class."""

    @abstractmethod
    def _matmat(self, X: Tensor) -> Tensor:
        """``S @ X`` for a validated 2-d operand."""

    @abstractmethod
    def _rmatmat(self, X: Tensor) -> Tensor:
        """``S^T @ X`` for a validated 2-d operand."""

    @abstractmethod
    def _from_inner(self, X: Tensor) -> StructuredMatrix:
        """``Pi(S^T X X^T S)`` for a validated 2-d operand."""

    @abstractmethod
    def _from_inner_eye(self) -> StructuredMatrix:
        """``Pi(S^T S)``."""


def view_setter(field: str, storage: str) -> Callable[[StructuredMatrix, Tensor], None]:
    """The setter of a property whose part is a view of packed storage: while the
    constructor validates (``self._parts`` exists) it collects the value; afterwards
    assignment raises (the view must be written in place)."""

    def setter(self: StructuredMatrix, value: Tensor) -> None:
        parts = getattr(self, "_parts", None)
        if parts is None:
            raise AttributeError(
                f"{self.name}: {field} is a view of {storage}; write into it in place "
                "instead of assigning"
            )
        parts[field] = value

    return setter


@functools.lru_cache(maxsize=256)  # e.g. one entry per loss scale or row count
def cached_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A shared 1-d tensor of ``values`` (only ever read), so that per-step constants cost no
    allocation or Python-number wrapping."""
    return torch.tensor(values, dtype=dtype, device=device)


#: Result sizes from which :func:`symmetric_gram` splits into blocks (3/4 of the flops of one
#: full product from there; below, the extra calls cost more than the flops they save).
_GRAM_BLOCKS_FROM = 256


def symmetric_gram(Y: Tensor) -> Tensor:
    """``Y^T Y`` for ``Y`` of shape ``(n, d)``; for ``d >= 256`` by three block products
    instead of the four of a full product (3/4 of the flops, off-diagonal blocks mirrored)."""
    d = Y.shape[1]
    if d < _GRAM_BLOCKS_FROM:
        return Y.T @ Y
    h = (d + 1) // 2
    Y1, Y2 = Y[:, :h], Y[:, h:]
    out = Y.new_empty(d, d)
    out[:h, :h] = Y1.T @ Y1
    lower = Y2.T @ Y1
    out[h:, :h] = lower
    out[:h, h:] = lower.T
    out[h:, h:] = Y2.T @ Y2
    return out


def _rebuild(name: str, dim: int, tensors: dict[str, Tensor]) -> StructuredMatrix:
    """Unpickle helper: look the class up by name and rebuild from stored tensors."""
    from singd.structures import structure

    return structure(name).from_dict(dim, tensors)
