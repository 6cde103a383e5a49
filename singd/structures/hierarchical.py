"""The hierarchical family ``hierarchical{K1}_{K2}``.

With ``k1 = min(K1, d)``, ``m = max(d - K1 - K2, 0)`` and ``k2 = d - k1 - m`` the matrix is::

    [[A, B1, B2],        A  (k1, k1) dense,  B = [B1, B2]  (k1, d - k1) row band
     [0, diag(c), 0],    c  (m,)   diagonal
     [0, D,  E ]]        D  (k2, m) dense,   E  (k2, k2) dense

so ``d <= K1`` is dense and ``K1 < d <= K1 + K2`` has no diagonal part. The pattern is closed
under products; ``B`` and ``D`` are one-sided (their mirror entries are structurally zero), so
``Pi`` doubles them.

Storage: two contiguous row bands, ``top = [A, B]`` ``(k1, d)`` and ``bot = [D, E]``
``(k2, d - k1)``, and ``c``. ``A``, ``B``, ``D``, ``E`` (the ``to_dict`` keys) are views of the
bands. At the sizes SINGD meets on a CPU each torch call costs a few microseconds whatever
its size, so the bands let most products be one matrix product per band instead of one per
block (about half the calls), and products with few columns run in the orientation whose
result is wide (``R @ S`` for ``R = X^T``), which small BLAS products handle several times
faster than tall ones.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix, view_setter

#: :meth:`Hierarchical.from_gram` works by bands from ``dim >= 4 (k1 + k2)``, below by two
#: dense products (below, the bands' extra calls cost more than the dense products' wasted
#: flops).
_FROM_GRAM_BANDS_FROM = 4


_BANDS = "the stored bands"


class Hierarchical(StructuredMatrix):
    """Hierarchical matrix; stored as the row bands ``top = [A, B]`` ``(k1, d)`` and
    ``bot = [D, E]`` ``(k2, d-k1)`` and the diagonal ``c`` ``(m,)`` (see the module docstring).

    Concrete classes come from ``structure("hierarchical{K1}_{K2}")``, which binds K1, K2,
    or from a subclass that sets ``K1`` and ``K2`` (or the reference package's ``MAX_K1`` and
    ``MAX_K2``), e.g. ``class H3_2(Hierarchical): K1, K2 = 3, 2``.
    """

    K1: ClassVar[int] = 0
    K2: ClassVar[int] = 0
    #: The reference package's names for ``K1`` and ``K2``.
    MAX_K1: ClassVar[int] = 0
    MAX_K2: ClassVar[int] = 0

    def __init_subclass__(cls, **kwargs) -> None:
        """Bind the block sizes of a subclass that sets ``K1, K2`` or ``MAX_K1, MAX_K2``."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        for ours, theirs in (("K1", "MAX_K1"), ("K2", "MAX_K2")):
            if theirs in own and ours not in own:
                setattr(cls, ours, own[theirs])
        K1, K2 = cls.K1, cls.K2
        for k in (K1, K2):
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"{cls.__name__}: K1 and K2 must be ints >= 1, got {K1!r}, {K2!r}")
        cls.MAX_K1, cls.MAX_K2 = K1, K2
        bound = {"K1", "K2", "MAX_K1", "MAX_K2"} & set(own)
        if K1 and K2 and bound and "name" not in own:
            cls.name = f"hierarchical{K1}_{K2}"

    _fields = ("A", "B", "c", "D", "E")
    top: Tensor
    c: Tensor
    bot: Tensor

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor) -> None:
        """Build from the five blocks (``A``, ``B``, ``D``, ``E`` copied into the two row
        bands, ``c`` kept); ``dim = A.shape[0] + B.shape[1]``."""
        self._check_concrete()
        if not (isinstance(A, Tensor) and isinstance(B, Tensor)) or A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"{self.name}: A and B must be 2-d tensors")
        self.dim = A.shape[0] + B.shape[1]
        if self.dim < 1:
            raise ValueError(f"{self.name}: dim = A.shape[0] + B.shape[1] must be >= 1")
        self._validate(A, B, c, D, E)

    def _validate(self, *tensors: Tensor) -> None:
        """Check the five blocks (base class rules) and copy them into the bands."""
        self._parts: dict[str, Tensor] = {}
        try:
            super()._validate(*tensors)  # the block setters below collect into _parts
            p = self._parts
        finally:
            del self._parts
        self.top = torch.cat([p["A"], p["B"]], 1)
        self._c = p["c"]
        self.bot = torch.cat([p["D"], p["E"]], 1)

    # ------------------------------------------------------------------ blocks as views
    A = property(lambda self: self.top[:, : self.top.shape[0]], view_setter("A", _BANDS))
    B = property(lambda self: self.top[:, self.top.shape[0] :], view_setter("B", _BANDS))
    c = property(lambda self: self._c, view_setter("c", _BANDS))
    C = property(lambda self: self._c, doc="``c`` under the reference package's name.")
    D = property(lambda self: self.bot[:, : self._c.shape[0]], view_setter("D", _BANDS))
    E = property(lambda self: self.bot[:, self._c.shape[0] :], view_setter("E", _BANDS))

    def _tensors(self) -> list[Tensor]:
        """The stored tensors ``[top, c, bot]`` (the bands, not the block views)."""
        return [self.top, self._c, self.bot]

    def _views(self) -> _Views:
        """The block views of the bands, made once per instance (making a view costs about
        as much as a small product; factors are reused over many steps and their bands are
        only ever written in place, never replaced)."""
        views = self.__dict__.get("_cached_views")
        if views is None:
            views = self._cached_views = _Views(self.top, self._c, self.bot)
        return views

    @classmethod
    def _wrap(cls, dim: int, top: Tensor, c: Tensor, bot: Tensor) -> Hierarchical:
        """An instance on the bands ``top``, ``bot`` and ``c`` (no validation)."""
        obj = cls.__new__(cls)
        obj.dim = dim
        obj.top = top
        obj._c = c
        obj.bot = bot
        return obj

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored tensors."""
        return self.top.dtype

    @property
    def device(self) -> torch.device:
        """The device of the stored tensors."""
        return self.top.device

    @classmethod
    def _storage_shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of the bands ``top``, ``c``, ``bot`` for ``dim``."""
        k1, m, k2 = cls._sizes(dim)
        return ((k1, dim), (m,), (k2, dim - k1))

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
    def _project(cls, dim: int, top: Tensor, m11: Tensor, bot: Tensor) -> Hierarchical:
        """Pi from the bands of a symmetric M: rows ``:k1`` (all columns), the diagonal of
        the middle block, rows ``k1+m:`` (columns ``k1:``), all fresh tensors.

        The row band B and the block D are one-sided, so they get twice M's entries
        (doubled in place).
        """
        k1 = top.shape[0]
        m = m11.shape[0]
        if k1 < dim:
            top[:, k1:].mul_(2)
        if m:
            bot[:, :m].mul_(2)
        return cls._wrap(dim, top, m11, bot)

    @classmethod
    def _from_dense(cls, mat: Tensor) -> Hierarchical:
        d = mat.shape[0]
        k1, m, _ = cls._sizes(d)
        j = k1 + m
        return cls._project(d, mat[:k1].clone(), mat.diagonal()[k1:j].clone(), mat[j:, k1:].clone())

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return top.clone()
        j = k1 + m
        out = top.new_zeros(self.dim, self.dim)
        out[:k1] = top
        if m:
            out.diagonal()[k1:j] = c
        out[j:, k1:] = bot
        return out

    def _diagonals(self) -> list[Tensor]:
        """Views of the diagonal entries: of ``A``, ``c`` and ``E`` (those that exist), made
        once per instance."""
        diagonals = self.__dict__.get("_cached_diagonals")
        if diagonals is None:
            top, c, bot = self.top, self._c, self.bot
            if bot.shape[0] == 0:
                diagonals = [top.diagonal()]
            elif c.shape[0] == 0:
                diagonals = [top.diagonal(), bot.diagonal()]
            else:
                diagonals = [top.diagonal(), c, bot.diagonal(c.shape[0])]
            self._cached_diagonals = diagonals
        return diagonals

    def _foreach_ok(self, value: Scalar) -> bool:
        """Whether ``torch._foreach_*`` may take ``value`` with the stored tensors."""
        return not isinstance(value, Tensor) or value.device == self.top.device

    def diag_add_(self, value: Scalar) -> Hierarchical:
        parts = self._diagonals()
        if self._foreach_ok(value):
            torch._foreach_add_(parts, value)
        else:
            for t in parts:
                t.add_(value)
        return self

    def trace(self) -> Tensor:
        parts = self._diagonals()  # dim entries in all
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).sum()

    def mul_(self, value: Scalar) -> Hierarchical:
        """In place ``self *= value`` for a scalar (one ``torch._foreach_mul_`` call)."""
        if isinstance(value, StructuredMatrix) or (isinstance(value, Tensor) and value.ndim != 0):
            return super().mul_(value)  # raises the base class's errors
        if self._foreach_ok(value):
            torch._foreach_mul_(self._tensors(), value)
            return self
        return super().mul_(value)

    def add_(self, other: StructuredMatrix, alpha: Scalar = 1.0) -> Hierarchical:
        """In place ``self += alpha * other`` (one ``torch._foreach_add_`` call)."""
        if type(other) is not type(self) or other.dim != self.dim or isinstance(alpha, Tensor):
            return super().add_(other, alpha)  # validation errors, tensor alpha
        torch._foreach_add_(self._tensors(), other._tensors(), alpha=alpha)
        return self

    def _matmul(self, other: Hierarchical) -> Hierarchical:
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return self._wrap(self.dim, top @ other.top, c, bot)  # c, bot: empty
        j = k1 + m
        v = self._views()
        top2, c2, bot2 = other.top, other._c, other.bot
        # [A, B] S' = [A A', A B' + [B1 diag(c') + B2 D', B2 E']]
        new_top = v.A @ top2
        new_top[:, k1:].addmm_(v.B2, bot2)
        # [0, D, E] S' = [0, D diag(c') + E D', E E']
        new_bot = v.E @ bot2
        if not m:
            return self._wrap(self.dim, new_top, c, new_bot)  # c: empty
        new_top[:, k1:j].addcmul_(v.B1, c2)
        new_bot[:, :m].addcmul_(v.D, c2)
        return self._wrap(self.dim, new_top, c * c2, new_bot)

    # Row forms (R of shape (n, d)): R S and R S^T. Column forms: S X and S^T X.
    def _rows_S(self, R: Tensor) -> Tensor:
        """``R S`` for ``R`` of shape ``(n, dim)``."""
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return R @ top
        j = k1 + m
        out = R[:, :k1] @ top
        out[:, k1:].addmm_(R[:, j:], bot)
        if m:
            out[:, k1:j].addcmul_(R[:, k1:j], c)
        return out

    def _rows_ST(self, R: Tensor) -> Tensor:
        """``R S^T`` for ``R`` of shape ``(n, dim)``."""
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return R @ top.T
        j = k1 + m
        out = R.new_empty(R.shape)
        torch.mm(R, top.T, out=out[:, :k1])
        torch.mm(R[:, k1:], bot.T, out=out[:, j:])
        if m:
            torch.mul(R[:, k1:j], c, out=out[:, k1:j])
        return out

    def _matmat(self, X: Tensor) -> Tensor:
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return top @ X
        j = k1 + m
        out = X.new_empty(X.shape)
        torch.mm(top, X, out=out[:k1])
        torch.mm(bot, X[k1:], out=out[j:])
        if m:
            torch.mul(X[k1:j], c.unsqueeze(1), out=out[k1:j])
        return out

    def _rmatmat(self, X: Tensor) -> Tensor:
        if X.stride(0) == 1 or X.shape[1] < 16:
            # The row form (X^T S)^T: measured faster (MKL, one thread) for a transposed X,
            # and for fewer than 16 columns, where the column form's (d, n) products are
            # several times slower than the row form's wide (n, k) @ (k, d) ones.
            return self._rows_S(X.T).T
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return top.T @ X
        j = k1 + m
        out = top.T @ X[:k1]
        out[k1:].addmm_(bot.T, X[j:])
        if m:
            out[k1:j].addcmul_(X[k1:j], c.unsqueeze(1))
        return out

    def _from_inner(self, X: Tensor) -> Hierarchical:
        # with Y = S^T X of shape (d, n) (either layout): M = Y Y^T, taken by row bands
        Y = self._rmatmat(X)
        k1, m = self.top.shape[0], self._c.shape[0]
        Y0 = Y[:k1]
        if k1 == self.dim:
            return self._wrap(self.dim, Y0 @ Y0.T, self._c, self.bot)  # c, bot: empty
        j = k1 + m
        if m:
            Y1 = Y[k1:j]
            m11 = (Y1 * Y1).sum(1)
        else:
            m11 = self._c  # empty
        return self._project(self.dim, Y0 @ Y.T, m11, Y[j:] @ Y[k1:].T)

    def _from_gram(self, A: Tensor) -> Hierarchical:
        """``Pi(S^T A S)`` for a symmetric ``A = X^T X`` of shape ``(dim, dim)`` (equal to
        ``from_inner(X^T)``), in ``O(dim^2 (K1 + K2))`` instead of two dense products."""
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        if k1 == self.dim:
            return self._wrap(self.dim, top.T @ (A @ top), c, bot)  # c, bot: empty
        if self.dim < _FROM_GRAM_BANDS_FROM * (k1 + bot.shape[0]):
            dense = self.to_dense()  # two small dense products take fewer torch calls
            return self._from_dense(dense.T @ A @ dense)
        j = k1 + m
        W = self._rows_S(A)  # A S; M = S^T W, whose row blocks are those of S^T
        W0 = W[:k1]
        v = self._views()
        new_top = v.At @ W0  # rows :k1 of S^T are [A^T, 0, 0]
        # rows k1+m: of S^T are [B2^T, 0, E^T]; columns k1: of M
        new_bot = torch.addmm(v.B2t @ W0[:, k1:], v.Et, W[j:, k1:])
        if m:  # diagonal entries: columns k1:k1+m of S ([B1; diag(c); D]) against W's
            m11 = (v.B1 * W0[:, k1:j]).sum(0)
            m11.addcmul_(c, W[k1:j, k1:j].diagonal()).add_((v.D * W[j:, k1:j]).sum(0))
        else:
            m11 = c  # empty
        return self._project(self.dim, new_top, m11, new_bot)

    def _from_inner_eye(self) -> Hierarchical:
        # S^T S: rows :k1 are A^T [A, B]; rows k1+m: (columns k1:) are B2^T B + E^T [D, E]
        top, c, bot = self.top, self._c, self.bot
        k1, m = top.shape[0], c.shape[0]
        v = self._views()
        if k1 == self.dim:
            return self._wrap(self.dim, v.At @ top, c, bot)  # c, bot: empty
        new_top = v.At @ top
        new_bot = torch.addmm(v.B2t @ v.B, v.Et, bot)
        if m:
            BD = torch.cat([v.B1, v.D])  # [B1; D]: the middle columns
            m11 = (BD * BD).sum(0).addcmul_(c, c)
        else:
            m11 = c  # empty
        return self._project(self.dim, new_top, m11, new_bot)


class _Views:
    """Block views of a hierarchical matrix's bands (see :meth:`Hierarchical._views`)."""

    __slots__ = ("A", "At", "B", "B1", "B2", "B2t", "D", "E", "Et")

    def __init__(self, top: Tensor, c: Tensor, bot: Tensor) -> None:
        k1, m = top.shape[0], c.shape[0]
        j = k1 + m
        self.A = top[:, :k1]
        self.At = self.A.T
        self.B = top[:, k1:]
        self.B1 = top[:, k1:j]
        self.B2 = top[:, j:]
        self.B2t = self.B2.T
        self.D = bot[:, :m]
        self.E = bot[:, m:]
        self.Et = self.E.T


@functools.cache
def hierarchical_class(K1: int, K2: int) -> type[Hierarchical]:
    """The ``hierarchical{K1}_{K2}`` class with K1, K2 bound, one per pair (the registry's
    ``structure("hierarchical{K1}_{K2}")``)."""
    if K1 < 1 or K2 < 1:
        raise ValueError(f"hierarchical K1 and K2 must be >= 1, got K1={K1}, K2={K2}")
    return type(
        f"Hierarchical{K1}_{K2}",
        (Hierarchical,),
        {"name": f"hierarchical{K1}_{K2}", "K1": K1, "K2": K2, "__module__": __name__},
    )


#: The reference package's names: its template (subclasses set ``MAX_K1``, ``MAX_K2``) and its
#: ``hierarchical15_15`` class (the registry's class, so ``isinstance`` checks agree).
HierarchicalMatrixTemplate = Hierarchical
Hierarchical15_15Matrix = hierarchical_class(15, 15)
