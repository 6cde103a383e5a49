"""Read-only views of optimizer state, the only door through which `diagnostics` looks in.

SINGD and KFAC both return ``dict[str, LayerFactors]`` from ``preconditioner_factors()``
(keyed by the module's qualified name in the model) and ``dict[str, dict[str, int]]``
from ``state_bytes()`` (layer -> component -> bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

#: How a factor's spectrum relates to the preconditioner it builds:
#: ``"root"``: the preconditioner factor is M M^T, so its eigenvalues are the squared
#: singular values of M (SINGD's K and C);
#: ``"symmetric"``: M itself is symmetric positive semi-definite (KFAC's A, G and inverses);
#: ``"momentum"``: a Riemannian momentum, summarised by norms only.
FactorRole = Literal["root", "symmetric", "momentum"]


@dataclass(frozen=True)
class FactorView:
    """One factor of one layer: a structured matrix (or dense tensor) and its role."""

    matrix: object  # a singd.structures StructuredMatrix, or a dense torch.Tensor
    role: FactorRole
    structure: str  # structure name, e.g. "dense", "diagonal", "hierarchical15_15"

    @property
    def dim(self) -> int:
        m = self.matrix
        return int(m.shape[0]) if isinstance(m, torch.Tensor) else int(m.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    def dense(self) -> torch.Tensor:
        """A dense copy of the factor (never the optimizer's own storage)."""
        m = self.matrix
        return m.detach().clone() if isinstance(m, torch.Tensor) else m.to_dense().detach().clone()


@dataclass(frozen=True)
class LayerFactors:
    """All preconditioner factors of one supported layer (read-only: do not mutate)."""

    layer: str
    module_type: str  # "Linear" | "Conv2d"
    factors: dict[str, FactorView] = field(default_factory=dict)
