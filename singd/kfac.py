"""KFAC: the baseline SINGD replaces (dense EMA Kronecker factors and their damped inverses).

For a supported layer (``nn.Linear``, ``nn.Conv2d``) with weight and bias treated jointly
as ``[W, b]`` (``d_C x d_K``), KFAC keeps two dense symmetric factors

    A ~ E[a^T a]   (d_K x d_K, layer inputs with a ones column for the bias)
    G ~ E[g^T g]   (d_C x d_C, gradients w.r.t. the layer output)

built from the same layer rows ``a`` and ``g`` (scaling, ``kfac_approx`` and
``loss_average`` as in SINGD) as exponential moving averages
``A <- ema_decay * A + (1 - ema_decay) * a^T a`` (the first update sets ``A = a^T a``).
On steps with ``step % T == 0`` (counting from 0) the factors are updated and inverted:

    A_inv = (A + damping I)^-1,  G_inv = (G + damping I)^-1

by Cholesky (``inverse_method="cholesky"``) or by a symmetric eigendecomposition with
eigenvalues clamped at zero (``"eigh"``), computed in ``inverse_dtype``. Every step the
gradient is preconditioned and applied with heavy-ball momentum exactly like SINGD:

    G^ = G_inv [grad W, grad b] A_inv;  s = G^ + weight_decay * [W, b]
    buf <- momentum * buf + s;  [W, b] <- [W, b] - lr * buf

Parameters of other modules (LayerNorm, ``nn.MultiheadAttention``'s in-projection and its
``out_proj``, free ``nn.Parameter`` s) take the same heavy-ball update on the raw gradient
(the first-order fallback) and are listed once in a warning.

Precision: factors are stored in ``factor_dtype`` (default: the weight's dtype). CPU and
CUDA linear algebra refuse bf16/fp16, and a factor can be numerically singular. When the
inverse cannot be computed in the requested dtype or is not finite,
``on_inverse_failure="upcast"`` (default, as KFAC libraries do) computes it in float32 (in
float64 when float32 itself failed) and keeps that inverse; ``state_bytes()`` then counts
the upcast working copy of the factor (``"A_upcast"``, ``"G_upcast"``) and the wider
inverse. ``on_inverse_failure="raise"`` raises :class:`KFACInverseError` instead.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from singd.capture import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    Capture,
    Layer,
    find_layers,
    grad_rows,
    input_rows,
    loss_average_count,
    weak_method,
)
from singd.dtypes import FLOAT_DTYPES, resolve_dtype
from singd.update import heavy_ball_step_
from singd.views import FactorView, LayerFactors

INVERSE_METHODS = ("cholesky", "eigh")
INVERSE_FAILURE_POLICIES = ("upcast", "raise")
_FACTORS = ("A", "G")


class KFACInverseError(RuntimeError):
    """A Kronecker factor could not be inverted: its dtype failed and upcasting was not
    allowed (``on_inverse_failure="raise"``), or the upcast inverse failed as well."""


def _try_inverse(factor: Tensor, damping: float, method: str, dtype: torch.dtype) -> Tensor:
    """``(factor + damping I)^-1`` computed in ``dtype``; raises on failure or non-finite output."""
    mat = factor.to(dtype)
    eye = torch.eye(mat.shape[0], dtype=dtype, device=mat.device)
    if method == "cholesky":
        chol = torch.linalg.cholesky(mat + damping * eye)
        inv = torch.cholesky_inverse(chol)
    else:
        evals, evecs = torch.linalg.eigh(mat)
        inv = (evecs / (evals.clamp(min=0) + damping)) @ evecs.T
    if not bool(torch.isfinite(inv).all()):
        raise FloatingPointError("the inverse has non-finite entries")
    return inv


def damped_inverse(
    factor: Tensor,
    damping: float,
    *,
    method: str = "cholesky",
    dtype: torch.dtype | None = None,
    on_failure: str = "upcast",
    what: str = "factor",
) -> tuple[Tensor, torch.dtype | None]:
    """Return ``((factor + damping I)^-1, upcast_dtype)`` for a symmetric PSD ``factor``.

    The inverse is computed in ``dtype`` (default: the factor's dtype). If that fails (the
    dtype is refused by ``torch.linalg``, the Cholesky factorisation breaks down, or the
    result is not finite) ``on_failure="upcast"`` retries in float32 (float64 if the first
    try was already float32 or wider) and returns the dtype it used as ``upcast_dtype``
    (``None`` when no upcast was needed); ``on_failure="raise"`` raises
    :class:`KFACInverseError` naming ``what``.
    """
    if method not in INVERSE_METHODS:
        raise ValueError(f"method must be one of {INVERSE_METHODS}; got {method!r}")
    if on_failure not in INVERSE_FAILURE_POLICIES:
        raise ValueError(
            f"on_failure must be one of {INVERSE_FAILURE_POLICIES}; got {on_failure!r}"
        )
    work = dtype or factor.dtype
    try:
        return _try_inverse(factor, damping, method, work), None
    except (RuntimeError, FloatingPointError) as err:
        if on_failure == "raise":
            raise KFACInverseError(
                f"KFAC cannot invert {what} ({tuple(factor.shape)}, stored in {factor.dtype}) "
                f"by {method} in {work}: {str(err).splitlines()[0]}. Pass "
                "on_inverse_failure='upcast' to invert in float32, or inverse_dtype=torch.float32."
            ) from err
        first_error = err
    up = torch.float64 if torch.finfo(work).bits >= 32 else torch.float32
    try:
        return _try_inverse(factor, damping, method, up), up
    except (RuntimeError, FloatingPointError) as err:
        raise KFACInverseError(
            f"KFAC cannot invert {what} ({tuple(factor.shape)}) by {method} in {work} "
            f"({str(first_error).splitlines()[0]}) nor after upcasting to {up} "
            f"({str(err).splitlines()[0]}); increase damping."
        ) from err


class KFAC(Optimizer):
    """KFAC with dense EMA factors, damped inverses every ``T`` steps and heavy-ball momentum.

    Args:
        model: the model whose ``nn.Linear`` / ``nn.Conv2d`` layers are preconditioned.
        params: parameters or param groups (default: all trainable parameters of ``model``).
            A layer's weight and bias must be in the same group.
        lr: learning rate (>= 0). momentum: heavy-ball momentum in [0, 1).
        damping: lambda > 0 added to both factors before inversion.
        weight_decay: gamma >= 0, added after preconditioning.
        T: update factors and inverses every ``T`` steps (int >= 1).
        ema_decay: EMA weight of the old factor, in [0, 1).
        inverse_method: "cholesky" or "eigh".
        factor_dtype: dtype of A and G (None: the weight's dtype); a dtype or its name.
        inverse_dtype: dtype the inverse is computed and kept in (None: factor_dtype).
        on_inverse_failure: "upcast" (default) or "raise", see the module docstring.
        kfac_approx: "expand" or "reduce" for weight-shared layers.
        loss_average: None, "batch" or "batch+sequence": how the loss averages, so that
            ``g`` can be rescaled to a per-sample gradient.
        warn_unsupported: warn once listing parameters trained by the first-order fallback.

    All arguments except ``model`` and ``params`` are also per-param-group keys. Use
    :meth:`preconditioner_factors` and :meth:`state_bytes` to look at the state.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        T: int = 10,
        ema_decay: float = 0.95,
        inverse_method: str = "cholesky",
        factor_dtype: torch.dtype | str | None = None,
        inverse_dtype: torch.dtype | str | None = None,
        on_inverse_failure: str = "upcast",
        kfac_approx: str = "expand",
        loss_average: str | None = "batch",
        warn_unsupported: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            T=T,
            ema_decay=ema_decay,
            inverse_method=inverse_method,
            factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype,
            on_inverse_failure=on_inverse_failure,
            kfac_approx=kfac_approx,
            loss_average=loss_average,
        )
        self._check_hypers(defaults)
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        params = list(params)
        if not params:
            raise ValueError("KFAC: the model has no trainable parameter (params is empty)")
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_hypers(group)

        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        search = find_layers(model, [p for g in self.param_groups for p in g["params"]])
        for name, layer in search.layers.items():
            if len({group_of[id(p)] for p in layer.params()}) > 1:
                raise ValueError(
                    f"KFAC: weight and bias of layer {name!r} must be in the same param group"
                )
        self._layers: dict[str, Layer] = search.layers
        self._layer_group = {n: group_of[id(lay.weight)] for n, lay in self._layers.items()}
        self._fallback = [(n, p, group_of[id(p)]) for n, (p, _) in search.others.items()]
        if self._fallback and warn_unsupported:
            listed = "; ".join(f"{n} ({why})" for n, (_, why) in search.others.items())
            warnings.warn(
                f"KFAC: {len(self._fallback)} parameters are trained by the first-order "
                f"fallback (heavy-ball SGD on the raw gradient): {listed}",
                UserWarning,
                stacklevel=2,
            )
        self._step_count = 0
        self._last_scale = 1.0
        self._stats: dict[str, list[Tensor]] = {}
        # The hooks reach the optimizer through a weak reference and are removed when it is
        # collected, so a model outliving its KFAC does no statistics work for it.
        self._capture = Capture(
            {n: lay.module for n, lay in self._layers.items()}, weak_method(self._on_capture)
        )
        weakref.finalize(self, self._capture.detach)
        self._attach_capture()

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_hypers(h: dict[str, Any]) -> None:
        """Raise a ValueError naming the first invalid hyper-parameter in ``h``."""
        lr, mom, damp = h["lr"], h["momentum"], h["damping"]
        if not (isinstance(lr, int | float) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0; got {lr!r}")
        if not (isinstance(mom, int | float) and 0 <= mom < 1):
            raise ValueError(f"momentum must lie in [0, 1); got {mom!r}")
        if not (isinstance(damp, int | float) and damp > 0):
            raise ValueError(f"damping must be > 0; got {damp!r}")
        if not (isinstance(h["weight_decay"], int | float) and h["weight_decay"] >= 0):
            raise ValueError(f"weight_decay must be >= 0; got {h['weight_decay']!r}")
        if not (isinstance(h["T"], int) and not isinstance(h["T"], bool) and h["T"] >= 1):
            raise ValueError(f"T must be an int >= 1; got {h['T']!r}")
        if not (isinstance(h["ema_decay"], int | float) and 0 <= h["ema_decay"] < 1):
            raise ValueError(f"ema_decay must lie in [0, 1); got {h['ema_decay']!r}")
        for key, valid in (
            ("inverse_method", INVERSE_METHODS),
            ("on_inverse_failure", INVERSE_FAILURE_POLICIES),
            ("kfac_approx", KFAC_APPROXIMATIONS),
            ("loss_average", LOSS_AVERAGES),
        ):
            if h[key] not in valid:
                raise ValueError(f"{key} must be one of {valid}; got {h[key]!r}")
        resolve_dtype(h["factor_dtype"], "factor_dtype")
        resolve_dtype(h["inverse_dtype"], "inverse_dtype")

    # ------------------------------------------------------------------ capture
    def _attach_capture(self) -> None:
        """Hook exactly the layers whose statistics are due at the coming step."""
        self._capture.attach(
            n
            for n in self._layers
            if self._step_count % self.param_groups[self._layer_group[n]]["T"] == 0
        )

    def _on_capture(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """Accumulate ``a^T a`` and ``g^T g`` (float32) of one forward/backward pass."""
        layer = self._layers[name]
        group = self.param_groups[self._layer_group[name]]
        approx = group["kfac_approx"]
        a = input_rows(layer.module, x, approx).float()
        g = grad_rows(layer.module, grad_output, approx).float()
        n = loss_average_count(layer.module, grad_output, group["loss_average"])
        aat = (a.T @ a) / a.shape[0]
        ggt = (g.T @ g) * n
        acc = self._stats.get(name)
        if acc is None:
            self._stats[name] = [aat, ggt]
        else:
            acc[0] += aat
            acc[1] += ggt

    # ------------------------------------------------------------------ state
    def _layer_state(self, layer: Layer, group: dict) -> dict[str, Any]:
        state = self.state[layer.weight]
        if "A" not in state:
            fdt = resolve_dtype(group["factor_dtype"], "factor_dtype") or layer.weight.dtype
            idt = resolve_dtype(group["inverse_dtype"], "inverse_dtype") or fdt
            dev = layer.weight.device
            for f, d in (("A", layer.in_dim), ("G", layer.out_dim)):
                state[f] = torch.eye(d, dtype=fdt, device=dev)
                state[f"{f}_inv"] = torch.eye(d, dtype=idt, device=dev) / (1 + group["damping"])
                state[f"{f}_upcasts"] = 0
            state["factor_updates"] = 0
        return state

    def _update_factors(
        self, layer: Layer, group: dict, aat: Tensor, ggt: Tensor, stat_scale: float
    ) -> None:
        """Fold this step's statistics into the EMA factors and recompute both inverses."""
        state = self._layer_state(layer, group)
        rho = group["ema_decay"] if state["factor_updates"] > 0 else 0.0
        stats = {"A": aat, "G": ggt / stat_scale**2 if stat_scale != 1.0 else ggt}
        idt = resolve_dtype(group["inverse_dtype"], "inverse_dtype")
        for f in _FACTORS:
            new = stats[f].to(state[f].dtype)
            state[f].mul_(rho).add_(new, alpha=1 - rho)
            inv, up = damped_inverse(
                state[f],
                group["damping"],
                method=group["inverse_method"],
                dtype=idt or state[f].dtype,
                on_failure=group["on_inverse_failure"],
                what=f"factor {f} of layer {layer.name!r}",
            )
            state[f"{f}_inv"] = inv
            if up is not None:
                state[f"{f}_upcasts"] += 1
            if inv.dtype != state[f].dtype:  # the inverse needed a wider working copy
                state[f"{f}_upcast_dtype"] = str(inv.dtype).removeprefix("torch.")
        state["factor_updates"] += 1

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Update factors/inverses on ``step % T == 0``, then take one preconditioned step."""
        if closure is not None:
            raise ValueError("KFAC.step does not take a closure (got one)")
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip = found_inf is not None and float(found_inf) > 0
        # With a GradScaler the gradients (and the captured g) are still scaled, unless
        # the user called scaler.unscale_(opt) first: then only the statistics are.
        inv_scale, stat_scale = 1.0, 1.0
        if grad_scale is not None:
            self._last_scale = stat_scale = float(grad_scale)
            inv_scale = 1.0 / stat_scale
        elif found_inf is not None:
            stat_scale = self._last_scale
        stats, self._stats = self._stats, {}
        updates: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for name, layer in self._layers.items():
            group = self.param_groups[self._layer_group[name]]
            if not skip and name in stats:
                self._update_factors(layer, group, *stats[name], stat_scale)
            grad = None if skip else layer.grad_matrix()
            if grad is None:
                continue
            state = self._layer_state(layer, group)
            a_inv, g_inv = state["A_inv"], state["G_inv"]
            work = torch.promote_types(a_inv.dtype, g_inv.dtype)
            pre = g_inv.to(work) @ grad.to(work) @ a_inv.to(work)
            if inv_scale != 1.0:
                pre.mul_(inv_scale)
            params, dirs = updates.setdefault(self._layer_group[name], ([], []))
            params.extend(layer.params())
            dirs.extend(d.to(layer.weight.dtype) for d in layer.split(pre))
        for _, p, gi in self._fallback:
            if not skip and p.grad is not None:
                params, dirs = updates.setdefault(gi, ([], []))
                params.append(p)
                dirs.append(p.grad * inv_scale if inv_scale != 1.0 else p.grad.clone())
        for gi, (params, dirs) in updates.items():
            group = self.param_groups[gi]
            heavy_ball_step_(
                self.state,
                params,
                dirs,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )
        self._step_count += 1
        self._attach_capture()

    # ------------------------------------------------------------------ views
    def preconditioner_factors(self) -> dict[str, LayerFactors]:
        """Read-only views of A, G, A_inv, G_inv per layer (empty before the first step)."""
        out: dict[str, LayerFactors] = {}
        for name, layer in self._layers.items():
            state = self.state.get(layer.weight, {})
            if "A" not in state:
                continue
            factors = {
                f: FactorView(state[f], "symmetric", "dense") for f in ("A", "G", "A_inv", "G_inv")
            }
            out[name] = LayerFactors(name, layer.kind, factors)
        return out

    def state_bytes(self) -> dict[str, dict[str, int]]:
        """Optimizer state bytes per layer (or ``"fallback"``) and component.

        Components: ``A``, ``G``, ``A_inv``, ``G_inv``; ``A_upcast`` / ``G_upcast`` (the
        working copy of a factor in the wider dtype its inverse was computed in, by the
        upcast policy or by ``inverse_dtype``) when there was one; ``momentum`` (heavy-ball
        buffers of the layer's parameters). Parameters trained by the first-order fallback
        are summed under the layer key ``"fallback"``.
        """

        def nbytes(t: Tensor) -> int:
            return t.numel() * t.element_size()

        out: dict[str, dict[str, int]] = {}
        for name, layer in self._layers.items():
            state = self.state.get(layer.weight, {})
            comps: dict[str, int] = {}
            for f in _FACTORS:
                if f in state:
                    comps[f] = nbytes(state[f])
                    comps[f"{f}_inv"] = nbytes(state[f"{f}_inv"])
                    if f"{f}_upcast_dtype" in state:
                        up = FLOAT_DTYPES[state[f"{f}_upcast_dtype"]]
                        comps[f"{f}_upcast"] = state[f].numel() * torch.finfo(up).bits // 8
            mom = sum(
                nbytes(self.state[p]["momentum_buffer"])
                for p in layer.params()
                if "momentum_buffer" in self.state.get(p, {})
            )
            comps["momentum"] = mom
            out[name] = comps
        if self._fallback:
            bufs = [self.state.get(p, {}).get("momentum_buffer") for _, p, _ in self._fallback]
            out["fallback"] = {"momentum": sum(nbytes(b) for b in bufs if b is not None)}
        return out

    def steps(self) -> int:
        """Number of ``step()`` calls so far (skipped GradScaler steps included)."""
        return self._step_count

    def fallback_parameters(self) -> dict[str, nn.Parameter]:
        """Qualified name -> parameter trained by the first-order fallback."""
        return {n: p for n, p, _ in self._fallback}

    def remove_hooks(self) -> None:
        """Remove the capture hooks from the model (factors then stay as they are)."""
        self._capture.detach()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop the statistics gathered with them."""
        self._stats = {}
        super().zero_grad(set_to_none=set_to_none)

    def upcast_count(self) -> int:
        """How many factor inverses so far needed an upcast (0 when every dtype worked)."""
        return sum(
            self.state[layer.weight].get(f"{f}_upcasts", 0)
            for layer in self._layers.values()
            for f in _FACTORS
            if layer.weight in self.state
        )

    # ------------------------------------------------------------------ checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping each factor's own dtype (torch would cast it to the param's)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        index = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(index):
            for key, value in saved.get(i, {}).items():
                if isinstance(value, Tensor) and key in ("A", "G", "A_inv", "G_inv"):
                    self.state[p][key] = value.to(device=p.device).clone()
        extra = state_dict.get("kfac", {})
        self._step_count = int(extra.get("step", self._step_count))
        self._last_scale = float(extra.get("last_scale", self._last_scale))
        self._stats = {}
        self._attach_capture()

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict plus ``"kfac"``: the step counter and the last loss scale."""
        sd = super().state_dict()
        sd["kfac"] = {"step": self._step_count, "last_scale": self._last_scale}
        return sd
