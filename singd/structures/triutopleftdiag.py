"""The ``triutopleftdiag`` structure: a diagonal and the last column (upper triangular)."""

from __future__ import annotations

from torch import Tensor

from singd.structures.diagonal_line import DiagonalLine


class TriuTopLeftDiagonalMatrix(DiagonalLine):
    """Upper triangular: the diagonal and the last column (``2 dim - 1`` free entries)::

    [[d_1,              c_1    ]
     [     ...          ...    ]
     [          d_{n-1} c_{n-1}]
     [                  c_n    ]]
    """

    name = "triutopleftdiag"
    by_row = False
    at_first = False

    def __init__(self, diag: Tensor, col: Tensor) -> None:
        """Build from the diagonal entries off the line ``d`` ``(dim - 1,)`` and the last column
        ``col`` ``(dim,)`` with its corner entry (both copied), as in the reference package."""
        self._init(diag, col)
