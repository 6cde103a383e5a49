"""`FlightRecorder`: copies of every factor on the last few recorded steps, kept for the
moment something goes wrong."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from diagnostics.record.quantities.base import Tables
from diagnostics.record.recording import Snapshot


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A host copy as numpy (16-bit types as float32)."""
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.to("cpu").numpy().copy()


class FlightRecorder:
    """A ring buffer of dense copies of every factor on the last ``size`` recorded steps.

    A factor unchanged since the previous copy (same `cache.Stamp`) is not copied again.
    At the first event or error (`freeze`), the ring and the factors at that step become
    ``recording.snapshots``; after that nothing more is copied.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = size == 0
        self._ring: deque[tuple[int, list[tuple[Any, torch.Tensor]]]] = deque(maxlen=size or 1)
        self._last: dict[Any, tuple[Any, torch.Tensor]] = {}

    def keep(self, step: int, factors: list) -> None:
        """Copy the factors of a recorded step into the ring (copies on their device)."""
        if self.done:
            return
        entries = []
        for f in factors:
            prev = self._last.get(f.key)
            same = (
                prev is not None
                and f.stamp is not None
                and prev[0].ref() is f.view.matrix
                and prev[0].versions == f.stamp.versions
            )
            copy = prev[1] if same else f.view.dense()
            self._last[f.key] = (f.stamp, copy)
            entries.append((f, copy))
        self._ring.append((step, entries))

    def freeze(self, step: int, factors: list, tables: Tables) -> None:
        """Write the ring (steps before ``step``) and the factors now into the tables, once."""
        if self.done:
            return
        self.done = True
        out = []
        for s, entries in self._ring:
            if s < step:
                out += [Snapshot(s, f.layer, f.name, f.view.role, _numpy(t)) for f, t in entries]
        out += [
            Snapshot(step, f.layer, f.name, f.view.role, _numpy(f.view.dense())) for f in factors
        ]
        tables.snapshots.extend(out)
        self._ring.clear()
        self._last.clear()
