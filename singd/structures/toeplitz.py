"""The shared base of the triangular Toeplitz structures (``triltoeplitz``, ``triutoeplitz``).

A lower triangular Toeplitz matrix has ``S[i, j] = t[i - j]`` for ``i >= j`` (zero above);
the upper one ``S[i, j] = t[j - i]`` for ``j >= i``. Both are stored as the coefficient
vector ``t`` of length ``d``. Lower (upper) triangular Toeplitz matrices commute and their
product has the truncated convolution of the coefficients, so the pattern is closed.

Products with dense ``X`` are causal convolutions along the rows, done by FFT in
``O(n d log d)`` from ``d >= _DENSE_BELOW`` and with the dense ``d x d`` matrix below (faster
there). ``Pi`` needs only the diagonal sums of the symmetric matrix, which for ``M = Y Y^T``
are the autocorrelations of the columns of ``Y`` (FFT again). The FFTs run in float32 for
half precision inputs (CPU FFT refuses them) and in the input dtype otherwise. The dense
matrix and the diagonal sums are strided views of padded vectors and matrices (one copy
each, no index tensors).
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from singd.structures.base import Scalar, StructuredMatrix

#: Sizes below which products and statistics use the dense ``d x d`` Toeplitz matrix: the
#: FFT's constant costs more than the dense ``O(n d^2)`` there; Toeplitz timings in
#: benchmarks/RESULTS.md, 'Structured matrices'.
_DENSE_BELOW = 224


def _lower_matrix(t: Tensor) -> Tensor:
    """The dense lower triangular Toeplitz matrix with coefficients ``t``: the rows of
    ``q = [t reversed, 0, ..., 0]`` read with strides (1, 1) are its rows bottom-up."""
    d = t.shape[0]
    q = torch.cat([t.flip(0), t.new_zeros(d - 1)])
    return q.as_strided((d, d), (1, 1)).flip(0)


def _upper_diagonal_sums(M: Tensor, dtype: torch.dtype) -> Tensor:
    """``D_k = sum_j M[j, j + k]`` in ``dtype``: with ``d`` zero columns appended to ``M``,
    the k-th diagonal is row k of the view with strides (1, 2d + 1) (past the last column
    it reads zeros)."""
    d = M.shape[0]
    P = torch.nn.functional.pad(M.to(dtype), (0, d))
    return P.as_strided((d, d), (1, 2 * d + 1)).sum(1)


@lru_cache(maxsize=32)
def _pi_weights(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[1/d, 2/(d-1), ..., 2/1]``: the weights of :meth:`TriangularToeplitz._project`."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable anywhere
        weights = _pi_counts(d, dtype, device).reciprocal().mul_(2)
        weights[0] = 0.5 * weights[0]
        return weights


@lru_cache(maxsize=32)
def _pi_counts(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[d, d - 1, ..., 1]``: the number of entries on each diagonal."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable anywhere
        return torch.arange(d, 0, -1, dtype=dtype, device=device)


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the FFTs run in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@lru_cache(maxsize=64)
def _fft_size(d: int) -> int:
    """The smallest even FFT length >= 2d - 1 (no wrap-around) with no prime factor above 5.

    A power of two is often twice as long (d = 513: 1080 instead of 2048), so the shorter
    5-smooth length does less work and keeps the FFT buffers in cache for longer."""
    n = 2 * d - 1
    if n <= 2:
        return n
    n += n % 2
    while True:
        k = n
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return n
        n += 2


class TriangularToeplitz(StructuredMatrix):
    """Triangular Toeplitz matrix stored as its coefficient vector ``t`` of shape ``(dim,)``."""

    lower: ClassVar[bool] = True
    _fields = ("t",)
    t: Tensor

    def __init__(self, t: Tensor) -> None:
        """Wrap the coefficients: ``t[k]`` is the value on the k-th sub- (super-) diagonal."""
        if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] < 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{self.name}: t must be a 1-d tensor of length >= 1, got {shape}")
        self.dim = t.shape[0]
        self._validate(t)

    @classmethod
    def _shapes(cls, dim: int) -> tuple[tuple[int, ...], ...]:
        return ((dim,),)

    # ------------------------------------------------------------------ Pi
    @classmethod
    def _project(cls, diag_sums: Tensor, dtype: torch.dtype) -> TriangularToeplitz:
        """Pi from the diagonal sums ``D_k = sum_j M[j + k, j]`` of a symmetric M.

        Off-diagonal entries are one-sided (doubled) and each diagonal is one tied value
        (averaged over its ``d - k`` entries): ``t_0 = D_0 / d``, ``t_k = 2 D_k / (d - k)``.
        """
        d = diag_sums.shape[0]
        weights = _pi_weights(d, diag_sums.dtype, diag_sums.device)
        return cls._wrap(d, (diag_sums * weights).to(dtype))

    @classmethod
    def _from_dense(cls, mat: Tensor) -> TriangularToeplitz:
        # the lower diagonals of S's side of mat are the upper diagonals of its transpose
        upper = mat.T if cls.lower else mat
        return cls._project(_upper_diagonal_sums(upper, _fft_dtype(mat.dtype)), mat.dtype)

    # ------------------------------------------------------------------ helpers
    def _dense_lower(self) -> Tensor:
        """The dense lower triangular Toeplitz matrix with coefficients ``t``."""
        return _lower_matrix(self.t)

    def _fft_lower_rows(self, Xt: Tensor, transpose: bool) -> Tensor:
        """``(L X)^T`` or ``(L^T X)^T`` by FFT, given ``Xt = X^T`` contiguous in the FFT dtype.

        Works along the last (contiguous) axis; returns a ``(n, d)`` view in the FFT dtype.
        """
        n = _fft_size(self.dim)
        ft = torch.fft.rfft(self.t.to(Xt.dtype), n)
        if transpose:  # correlation: (L^T X)[i] = sum_j t[j - i] X[j]
            ft = ft.conj()
        fx = torch.fft.rfft(Xt, n, dim=1)
        fx.mul_(ft)
        return torch.fft.irfft(fx, n, dim=1)[:, : self.dim]

    def _apply_lower(self, X: Tensor, transpose: bool) -> Tensor:
        """``L X`` or ``L^T X`` for the lower Toeplitz ``L`` with coefficients ``t``."""
        if self.dim < _DENSE_BELOW:
            L = self._dense_lower()
            return (L.T if transpose else L) @ X
        Xt = X.T.to(dtype=_fft_dtype(X.dtype), memory_format=torch.contiguous_format)
        Yt = self._fft_lower_rows(Xt, transpose)
        return Yt.T.to(dtype=X.dtype, memory_format=torch.contiguous_format)

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        """``S X`` (or ``S^T X``); the upper matrix is the transpose of the lower one."""
        return self._apply_lower(X, transpose == self.lower)

    # ------------------------------------------------------------------ interface
    def to_dense(self) -> Tensor:
        L = self._dense_lower()
        return L if self.lower else L.T.contiguous()

    def diag_add_(self, value: Scalar) -> TriangularToeplitz:
        self.t[0].add_(value)
        return self

    def trace(self) -> Tensor:
        return self.t[0] * self.dim

    def infinity_vector_norm(self) -> Tensor:
        return self.t.abs().max()

    def frobenius_norm(self) -> Tensor:
        # t[k] appears on d - k entries
        counts = _pi_counts(self.dim, self.t.dtype, self.t.device)
        return (self.t.square() * counts).sum().sqrt()

    def _matmul(self, other: TriangularToeplitz) -> TriangularToeplitz:
        # Coefficients of the product: first d terms of the convolution t * t'.
        # (Upper: S_u(t) = J S_l(t) J, so the same formula holds.)
        d = self.dim
        if d < _DENSE_BELOW:
            coeffs = self._dense_lower() @ other.t
        else:
            n = _fft_size(d)
            ftype = _fft_dtype(self.dtype)
            prod = torch.fft.rfft(self.t.to(ftype), n) * torch.fft.rfft(other.t.to(ftype), n)
            coeffs = torch.fft.irfft(prod, n)[:d].to(self.dtype)
        return self._wrap(d, coeffs)

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def _rmatmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=True)

    def _from_inner(self, X: Tensor) -> TriangularToeplitz:
        # D_k = sum_j (Y Y^T)[j + k, j] = sum over columns of the autocorrelation of Y.
        d = self.dim
        if d < _DENSE_BELOW:  # small: dense Y Y^T and its diagonal sums are cheaper
            Y = self._apply(X, transpose=True)
            return self._from_dense(Y @ Y.T)
        n = _fft_size(d)
        Xt = X.T.to(dtype=_fft_dtype(X.dtype), memory_format=torch.contiguous_format)
        Yt = self._fft_lower_rows(Xt, transpose=self.lower)  # (S^T X)^T
        fy = torch.fft.rfft(Yt, n, dim=1)
        power = fy.real.square().add_(fy.imag.square()).sum(0)
        sums = torch.fft.irfft(power.to(fy.dtype), n)[:d]
        return self._project(sums, self.dtype)

    def _from_inner_eye(self) -> TriangularToeplitz:
        # For S = S_l(t) (or S_u(t)): D_k = sum_p t_p u_{p+k} with u_q = (d - q) t_q,
        # i.e. D = L(t)^T u (dense) or a correlation (FFT).
        d = self.dim
        ftype = _fft_dtype(self.dtype)
        t = self.t.to(ftype)
        u = t * _pi_counts(d, ftype, t.device)
        if d < _DENSE_BELOW:
            return self._project(_lower_matrix(t).T @ u, self.dtype)
        n = _fft_size(d)
        corr = torch.fft.rfft(t, n).conj() * torch.fft.rfft(u, n)
        return self._project(torch.fft.irfft(corr, n)[:d], self.dtype)
