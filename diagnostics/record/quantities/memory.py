"""`Memory`: optimizer state bytes per layer and component, and the process's peaks."""

from __future__ import annotations

import torch

from diagnostics.record import metrics as M
from diagnostics.record.quantities.base import PROCESS, MemoryRow, Params, Tables


class Memory:
    """State bytes through ``optimizer.state_bytes()`` when the optimizer has it (SINGD,
    KFAC), else per key of ``optimizer.state``; peak resident memory (Linux ``VmHWM``,
    reset after each read where the kernel allows it) and ``torch.cuda.max_memory_allocated``
    (reset after each read) since the previous recorded step."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Params) -> None:
        self.optimizer = optimizer
        self.params = params
        self._has_state_bytes = callable(getattr(optimizer, "state_bytes", None))
        self.peak_reset = M.reset_peak_rss()
        M.cuda_peak_bytes(reset=True)

    def record(self, step: int, tables: Tables) -> None:
        """Add this step's memory rows."""
        rows = tables.memory
        if self._has_state_bytes:
            for layer, comps in self.optimizer.state_bytes().items():
                for comp, b in comps.items():
                    rows.append(MemoryRow(step, str(layer), str(comp), int(b)))
        else:
            per: dict[tuple[str, str], int] = {}
            for p, (layer, _) in zip(self.params.tensors, self.params.names):
                st = self.optimizer.state.get(p)
                if st:
                    for key, b in M.state_bytes_by_key(st).items():
                        per[(layer, key)] = per.get((layer, key), 0) + b
            for (layer, key), b in per.items():
                rows.append(MemoryRow(step, layer, key, b))
        rss = M.read_peak_rss()
        if rss is not None:
            rows.append(MemoryRow(step, PROCESS, "peak_rss", rss))
            if self.peak_reset:
                M.reset_peak_rss()
        cuda = M.cuda_peak_bytes(reset=True)
        if cuda is not None:
            rows.append(MemoryRow(step, PROCESS, "cuda_max_allocated", cuda))
