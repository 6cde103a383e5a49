"""`ActivationHooks`: forward and output-gradient hooks installed for one step at a time.

The hooks note each floating-point input, output and output gradient of every module that
owns parameters; the tensors are checked for NaN/Inf at `Recorder.step`, in the recorded
step's one fused norm pass. Hooks return nothing: they never replace an activation or a
gradient. Hooked tensors are referenced until `Recorder.step` (activations are kept by
autograd anyway; output gradients add about one activation's worth).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from diagnostics.record import metrics as M
from diagnostics.record.quantities.base import (
    LOW_PRECISION,
    MODEL,
    Finding,
    LayerIndex,
    fused_norms,
)


class Hooked(NamedTuple):
    """A tensor a hook saw: where, its version counter then, and its NaN/Inf counts when
    it was checked at once (``counts`` None: check it at `Recorder.step`)."""

    phase: str
    layer: str
    name: str
    tensor: torch.Tensor
    version: int
    counts: torch.Tensor | None


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Floating-point tensors in a module's inputs or outputs (tuples/lists/dicts, one level)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for t in obj if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if isinstance(obj, dict):
        return [t for t in obj.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return []


class ActivationHooks:
    """Installs and removes the per-step hooks and collects what they saw."""

    def __init__(self, model: nn.Module | None, index: LayerIndex | None = None) -> None:
        self.index = index if index is not None else LayerIndex(model)
        self.modules: list[tuple[str, nn.Module]] = []
        if model is not None:
            for name, mod in model.named_modules():
                if any(True for _ in mod.parameters(recurse=False)):
                    self.modules.append((name or MODEL, mod))
        self.armed = False
        self._handles: list[Any] = []
        self._items: list[Hooked] = []
        self._eager: set[tuple[str, str]] = set()

    def arm(self) -> None:
        """Install forward hooks (and through them output-gradient hooks) for one step."""
        if self.armed or not self.modules:
            return
        for name, mod in self.modules:
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
        self.armed = True

    def disarm(self) -> None:
        """Remove the per-step hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False

    def take(self) -> list[Hooked]:
        """What the hooks saw since the last call (and forget it)."""
        items, self._items = self._items, []
        return items

    def _forward_hook(self, layer: str):
        """The forward hook of one module (registers output-gradient hooks in turn)."""

        def grad_hook(tensor_name: str):
            def hook(g: torch.Tensor) -> None:
                self._note("backward", layer, tensor_name, g)

            return hook

        def forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():  # evaluation passes are not training steps
                return
            self.index.saw(layer)
            for i, t in enumerate(_tensors(inputs)):
                self._note("forward", layer, "input" if i == 0 else f"input{i}", t)
            for i, t in enumerate(_tensors(output)):
                name = "output" if i == 0 else f"output{i}"
                self._note("forward", layer, name, t)
                if t.requires_grad:
                    t.register_hook(grad_hook("grad_" + name))

        return forward_hook

    def _note(self, phase: str, layer: str, name: str, t: torch.Tensor) -> None:
        """Keep one hooked tensor for the check at `Recorder.step`.

        Its version counter is kept: if it is modified in place before `Recorder.step`
        (e.g. by ``ReLU(inplace=True)``), the values seen then are not the ones the hook
        saw, so that (layer, name) is checked at once in the hook from then on.
        """
        t = t.detach()
        if (layer, name) not in self._eager:
            self._items.append(Hooked(phase, layer, name, t, t._version, None))
            return
        norm = torch.linalg.vector_norm(
            t, dtype=torch.float32 if t.dtype in LOW_PRECISION else None
        )
        if not math.isfinite(norm.item()):
            self._items.append(Hooked(phase, layer, name, t, t._version, M.count_vector(t)))

    def lazy(self, items: list[Hooked]) -> list[Hooked]:
        """The items still to be checked (noting those changed in place since the hook)."""
        lazy = [it for it in items if it.counts is None]
        for it in lazy:
            if it.tensor._version != it.version:  # changed in place: check at once later
                self._eager.add((it.layer, it.name))
        return lazy

    def findings(self, items: list[Hooked], norms: list[float] | None = None) -> list[Finding]:
        """The hooked tensors that held NaN/Inf (``norms``: those of `lazy` ``(items)``)."""
        found = [
            Finding(it.phase, it.layer, it.name, it.tensor, it.counts)
            for it in items
            if it.counts is not None
        ]
        lazy = self.lazy(items)
        if norms is None:
            norms = fused_norms([it.tensor for it in lazy])
        for it, n in zip(lazy, norms):
            if not math.isfinite(n):
                counts = M.count_vector(it.tensor)
                found.append(Finding(it.phase, it.layer, it.name, it.tensor, counts))
        return found
