"""`Activations`: per-layer norms of the hooked activations and output gradients."""

from __future__ import annotations

import math

from diagnostics.record.hooks import Hooked
from diagnostics.record.quantities.base import MetricRow, Tables


class Activations:
    """On recorded steps, the norm and RMS of each layer's hooked tensors (inputs, outputs,
    output gradients): rows ``(step, layer, tensor, "norm" | "rms")`` where ``tensor`` is
    ``input``, ``output`` or ``grad_output`` (``input1``, ``output1``, ... for more). The
    norms are those the recorded step's fused pass takes for the finiteness check; a
    module called several times in one step gets the norm over all its calls."""

    def record(self, step: int, items: list[Hooked], norms: list[float], tables: Tables) -> None:
        """Add the rows of one recorded step (``norms``: one per item, in order)."""
        sq: dict[tuple[str, str], list[float]] = {}
        for it, n in zip(items, norms):
            acc = sq.setdefault((it.layer, it.name), [0.0, 0])
            acc[0] += n * n
            acc[1] += it.tensor.numel()
        rows = tables.metrics
        for (layer, name), (total, numel) in sq.items():
            norm = math.sqrt(total)
            rows.append(MetricRow(step, layer, name, "norm", norm))
            rows.append(MetricRow(step, layer, name, "rms", norm / math.sqrt(max(numel, 1))))
