"""The ``triltopleftdiag`` structure: a diagonal and the last row (lower triangular)."""

from __future__ import annotations

from torch import Tensor

from singd.structures.diagonal_line import DiagonalLine


class TrilTopLeftDiagonalMatrix(DiagonalLine):
    """Lower triangular: the diagonal and the last row (``2 dim - 1`` free entries)::

    [[d_1,                  ]
     [      ...             ]
     [          d_{n-1}     ]
     [r_1, ...,  r_{n-1}, r_n]]
    """

    name = "triltopleftdiag"
    by_row = True
    at_first = False

    def __init__(self, diag: Tensor, row: Tensor) -> None:
        """Build from the diagonal entries off the line ``d`` ``(dim - 1,)`` and the last row
        ``row`` ``(dim,)`` with its corner entry (both copied), as in the reference package."""
        self._init(diag, row)
