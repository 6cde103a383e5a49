"""The ``triltoeplitz`` structure: lower triangular Toeplitz, one value per diagonal."""

from __future__ import annotations

from singd.structures.toeplitz import TriangularToeplitz


class TrilToeplitz(TriangularToeplitz):
    """Lower triangular Toeplitz: ``S[i, j] = t[i - j]`` for ``i >= j``."""

    name = "triltoeplitz"
    lower = True


#: The reference package's name for :class:`TrilToeplitz`.
TrilToeplitzMatrix = TrilToeplitz
