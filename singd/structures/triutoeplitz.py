"""The ``triutoeplitz`` structure: upper triangular Toeplitz, one value per diagonal."""

from __future__ import annotations

from singd.structures.toeplitz import TriangularToeplitz


class TriuToeplitz(TriangularToeplitz):
    """Upper triangular Toeplitz: ``S[i, j] = t[j - i]`` for ``j >= i``."""

    name = "triutoeplitz"
    lower = False


#: The reference package's name for :class:`TriuToeplitz`.
TriuToeplitzMatrix = TriuToeplitz
