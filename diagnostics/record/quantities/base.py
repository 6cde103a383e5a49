"""What the quantities share: their records, the parameters they name, one fused norm pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Layer name of rows about the whole model (the loss, errors without a layer).
MODEL = "(model)"
#: Layer name of memory rows about the whole process (peaks).
PROCESS = "(process)"


class Probe(NamedTuple):
    """A tensor a recorded step takes the norm of, with the phase, layer and name it has in
    events; ``norm`` is set when it is already known (an unchanged factor's cached norm)."""

    phase: str
    layer: str
    name: str
    tensor: torch.Tensor
    norm: float | None = None


class Finding(NamedTuple):
    """A tensor that holds NaN/Inf and its counts (`metrics.count_vector`): an event to be."""

    phase: str
    layer: str
    name: str
    tensor: torch.Tensor
    counts: torch.Tensor


class MetricRow(NamedTuple):
    """One row of ``recording.metrics``."""

    step: int
    layer: str
    factor: str
    metric: str
    value: float


class MemoryRow(NamedTuple):
    """One row of ``recording.memory``."""

    step: int
    layer: str
    component: str
    bytes: int


class SpectrumBlock(NamedTuple):
    """The eigenvalues of one factor at one step (rows of ``recording.spectra``)."""

    step: int
    layer: str
    factor: str
    eigenvalues: np.ndarray


@dataclass
class Tables:
    """The rows recorded so far, one list per frame of the `Recording`."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    spectra: list[SpectrumBlock] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)


@dataclass
class StepContext:
    """What a recorded (or inspected) step is: its number, its row of ``steps``, its loss."""

    step: int
    row: dict[str, Any]
    loss: Any
    skipped: bool
    grad_scale: float


@dataclass
class Params:
    """The optimizer's parameters in order, each with its layer and short name."""

    tensors: list[torch.Tensor]
    names: list[tuple[str, str]]
    index: dict[int, int]
    sizes: list[int]
    cpu: bool
    #: small models on one device and dtype: one concatenated copy instead of one per tensor
    flat: bool

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, model: nn.Module | None) -> Params:
        """Name the optimizer's parameters after the model's modules (``param{i}`` without)."""
        tensors = [p for g in optimizer.param_groups for p in g["params"]]
        found: dict[int, tuple[str, str]] = {}
        if model is not None:
            for mod_name, mod in model.named_modules():
                for pname, p in mod.named_parameters(recurse=False):
                    found.setdefault(id(p), (mod_name or MODEL, pname))
        names = [found.get(id(p), (f"param{i}", "param")) for i, p in enumerate(tensors)]
        sizes = [p.numel() for p in tensors]
        flat = (
            bool(tensors)
            and len({(p.device, p.dtype) for p in tensors}) == 1
            and sum(sizes) <= 1 << 22  # small models: per-tensor op overhead dominates
        )
        return cls(
            tensors=tensors,
            names=names,
            index={id(p): i for i, p in enumerate(tensors)},
            sizes=sizes,
            cpu=all(p.device.type == "cpu" for p in tensors),
            flat=flat,
        )


def fused_norms(tensors: list[torch.Tensor], ord: float = 2) -> list[float]:
    """``ord``-norms as Python floats (16-bit tensors reduced in float32), one host sync.

    A norm is non-finite exactly when the tensor holds NaN/Inf, or when the norm itself
    overflows (then a later detailed count finds nothing and no event is made).
    """
    if not tensors:
        return []
    low = [i for i, t in enumerate(tensors) if t.dtype in LOW_PRECISION]
    high = [i for i, t in enumerate(tensors) if t.dtype not in LOW_PRECISION]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx, kw in ((low, {"dtype": torch.float32}), (high, {})):
        if not idx:
            continue
        group = [tensors[i] for i in idx]
        try:
            res = torch._foreach_norm(group, ord, **kw)
        except (RuntimeError, TypeError):  # pragma: no cover - unusual tensors / old torch
            res = [torch.linalg.vector_norm(t, ord, **kw) for t in group]
        for i, r in zip(idx, res):
            out[i] = r
    if all(o.device.type == "cpu" for o in out):
        return [float(o) for o in out]  # no sync to save on the CPU; stacking costs more
    dev = out[0].device
    return torch.stack([o.to(dev, torch.float64) for o in out]).cpu().tolist()
