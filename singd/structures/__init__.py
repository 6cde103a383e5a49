"""Structured matrices for SINGD's Kronecker factors, and the name registry.

``structure(name)`` returns the class for a structure name (parametric names such as
``"block30diagonal"`` or ``"hierarchical15_15"`` give a cached class with its parameters
bound, so ``structure(n) is structure(n)``); ``names()`` lists valid example names and
``FORMS`` the accepted name forms.
"""

from __future__ import annotations

import re
from functools import cache

from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonal, block_diagonal_class
from singd.structures.dense import Dense
from singd.structures.diagonal import Diagonal
from singd.structures.diagonal_line import DiagonalLine
from singd.structures.hierarchical import Hierarchical, hierarchical_class
from singd.structures.toeplitz import TriangularToeplitz
from singd.structures.triangular import Triangular, Tril, Triu
from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix
from singd.structures.triltoeplitz import TrilToeplitz
from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix
from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix
from singd.structures.triutoeplitz import TriuToeplitz
from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix

__all__ = [
    "FORMS",
    "BlockDiagonal",
    "Dense",
    "Diagonal",
    "DiagonalLine",
    "Hierarchical",
    "StructuredMatrix",
    "Triangular",
    "TriangularToeplitz",
    "Tril",
    "TrilBottomRightDiagonalMatrix",
    "TrilToeplitz",
    "TrilTopLeftDiagonalMatrix",
    "Triu",
    "TriuBottomRightDiagonalMatrix",
    "TriuToeplitz",
    "TriuTopLeftDiagonalMatrix",
    "names",
    "structure",
]

_FIXED: dict[str, type[StructuredMatrix]] = {
    "dense": Dense,
    "diagonal": Diagonal,
    "triltoeplitz": TrilToeplitz,
    "triutoeplitz": TriuToeplitz,
    "tril": Tril,
    "triu": Triu,
    "triltopleftdiag": TrilTopLeftDiagonalMatrix,
    "trilbottomrightdiag": TrilBottomRightDiagonalMatrix,
    "triutopleftdiag": TriuTopLeftDiagonalMatrix,
    "triubottomrightdiag": TriuBottomRightDiagonalMatrix,
}

#: Every accepted name form; ``{N}``, ``{K1}``, ``{K2}`` are positive integers.
FORMS: tuple[str, ...] = (*_FIXED, "block{N}diagonal", "hierarchical{K1}_{K2}")

#: Parametric forms: a full-match pattern and the factory taking the parsed integers.
_PARAMETRIC = (
    (re.compile(r"block([1-9][0-9]*)diagonal"), block_diagonal_class),
    (re.compile(r"hierarchical([1-9][0-9]*)_([1-9][0-9]*)"), hierarchical_class),
)
_EXAMPLES: tuple[str, ...] = ("block30diagonal", "hierarchical15_15")


def names() -> tuple[str, ...]:
    """Canonical structure names: the fixed ones plus one example of each parametric form."""
    return (*_FIXED, *_EXAMPLES)


@cache
def _lookup(name: str) -> type[StructuredMatrix]:
    """Resolve a name to its (cached) class, or raise ValueError listing the valid forms."""
    if name in _FIXED:
        return _FIXED[name]
    for pattern, make in _PARAMETRIC:
        match = pattern.fullmatch(name)
        if match:
            return make(*(int(g) for g in match.groups()))
    raise ValueError(
        f"unknown structure {name!r}; valid forms: {', '.join(FORMS)} "
        "(N, K1, K2 positive integers without leading zeros, e.g. 'block30diagonal', "
        "'hierarchical15_15')"
    )


def structure(name: str | type[StructuredMatrix]) -> type[StructuredMatrix]:
    """The structured-matrix class for ``name`` (a class is returned unchanged)."""
    if isinstance(name, type) and issubclass(name, StructuredMatrix) and name.name:
        return name
    if not isinstance(name, str):
        raise TypeError(f"structure name must be a str, got {type(name).__name__}")
    return _lookup(name)
