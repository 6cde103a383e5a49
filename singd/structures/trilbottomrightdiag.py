"""The ``trilbottomrightdiag`` structure: the first column and a diagonal (lower triangular)."""

from __future__ import annotations

from torch import Tensor

from singd.structures.diagonal_line import DiagonalLine


class TrilBottomRightDiagonalMatrix(DiagonalLine):
    """Lower triangular: the first column and the diagonal (``2 dim - 1`` free entries)::

    [[c_1,                ]
     [c_2, d_1,           ]
     [...,     ...        ]
     [c_n,          d_{n-1}]]
    """

    name = "trilbottomrightdiag"
    by_row = False
    at_first = True

    def __init__(self, diag: Tensor, col: Tensor) -> None:
        """Build from the diagonal entries off the line ``d`` ``(dim - 1,)`` and the first column
        ``col`` ``(dim,)`` with its corner entry (both copied), as in the reference package."""
        self._init(diag, col)
