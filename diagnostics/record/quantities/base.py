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
    errors: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[Any] = field(default_factory=list)


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


def layer_kind(module: nn.Module) -> str:
    """What a layer is, in a few characters: ``"Linear 64→128"``, ``"Conv2d 3→16 3x3"``,
    ``"Embedding 64×128"``, ``"LayerNorm 128"``; else the class name and its weight's shape."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return f"{name} {module.in_features}→{module.out_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        k = "x".join(str(d) for d in module.kernel_size)
        return f"{name} {module.in_channels}→{module.out_channels} {k}"
    if isinstance(module, nn.Embedding):
        return f"{name} {module.num_embeddings}×{module.embedding_dim}"
    if name == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):  # transformers
        return f"{name} {module.nx}→{module.nf}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return f"{name} " + "×".join(str(d) for d in weight.shape)
    shapes = ["×".join(str(d) for d in p.shape) for p in module.parameters(recurse=False)]
    return " ".join([name, *shapes[:2]])


class LayerIndex:
    """Each layer's kind (`layer_kind`) and position in the forward pass: the order in which
    the forward hooks saw the layers, else (not seen yet) the order of ``named_modules``."""

    def __init__(self, model: nn.Module | None) -> None:
        self.kinds: dict[str, str] = {}
        self._module_order: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        if model is not None:
            for i, (name, mod) in enumerate(model.named_modules()):
                self.kinds.setdefault(name or MODEL, layer_kind(mod))
                self._module_order.setdefault(name or MODEL, i)

    def saw(self, layer: str) -> None:
        """Note that ``layer``'s forward ran (the first time fixes its position)."""
        if layer not in self.seen:
            self.seen[layer] = len(self.seen)

    def kind(self, layer: str) -> str:
        """The layer's kind, or "" for names that are no module (``"(model)"``, ``param3``)."""
        return "model" if layer == MODEL else self.kinds.get(layer, "")

    def position(self, layer: str) -> tuple[int, int]:
        """A sort key: earlier in the forward pass sorts first; unknown names last."""
        if layer in self.seen:
            return (0, self.seen[layer])
        return (1, self._module_order.get(layer, 1 << 30))

    def table(self, layers: list[str]) -> list[dict[str, Any]]:
        """``meta["layers"]``: the given layers in forward order with kind and position."""
        ordered = sorted(dict.fromkeys(layers), key=self.position)
        return [{"layer": n, "kind": self.kind(n), "order": i} for i, n in enumerate(ordered)]


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
