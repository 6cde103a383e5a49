"""The ``triubottomrightdiag`` structure: the first row and a diagonal (upper triangular)."""

from __future__ import annotations

from torch import Tensor

from singd.structures.diagonal_line import DiagonalLine


class TriuBottomRightDiagonalMatrix(DiagonalLine):
    """Upper triangular: the first row and the diagonal (``2 dim - 1`` free entries)::

    [[r_1, r_2, ..., r_n    ]
     [     d_1,            ]
     [          ...        ]
     [               d_{n-1}]]
    """

    name = "triubottomrightdiag"
    by_row = True
    at_first = True

    def __init__(self, diag: Tensor, row: Tensor) -> None:
        """Build from the diagonal entries off the line ``d`` ``(dim - 1,)`` and the first row
        ``row`` ``(dim,)`` with its corner entry (both copied), as in the reference package."""
        self._init(diag, row)
