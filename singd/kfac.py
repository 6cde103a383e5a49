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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from singd.base import (
    FIRST_ORDER_DEFAULTS,
    AmpScales,
    FirstOrderBatch,
    FirstOrderConfig,
    KroneckerOptimizer,
    LayerRecord,
    check_bool,
    check_choice,
    check_int,
    check_number,
)
from singd.capture import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    Layer,
    grad_rows,
    input_rows,
    loss_average_count,
)
from singd.dtypes import FLOAT_DTYPES, resolve_dtype
from singd.views import FactorView, LayerFactors

INVERSE_METHODS = ("cholesky", "eigh")
INVERSE_FAILURE_POLICIES = ("upcast", "raise")
_FACTORS = ("A", "G")

#: Hyper-parameters and their defaults (also the per-param-group keys).
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.9,
    "damping": 1e-3,
    "weight_decay": 0.0,
    "T": 10,
    "ema_decay": 0.95,
    "inverse_method": "cholesky",
    "factor_dtype": None,
    "inverse_dtype": None,
    "on_inverse_failure": "upcast",
    "kfac_approx": "expand",
    "loss_average": "batch",
    "warn_unsupported": True,
    **FIRST_ORDER_DEFAULTS,
}
#: KFAC's own hyper-parameters (the rest are the shared first-order ones).
_OWN = tuple(k for k in DEFAULTS if k not in FIRST_ORDER_DEFAULTS)


class KFACInverseError(RuntimeError):
    """A Kronecker factor could not be inverted: its dtype failed and upcasting was not
    allowed (``on_inverse_failure="raise"``), or the upcast inverse failed as well."""


# ---------------------------------------------------------------------- the math
def kronecker_statistics(a: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(a^T a / rows, n g^T g)``: one backward pass's contribution to A and G."""
    return (a.T @ a) / a.shape[0], (g.T @ g) * n


def ema_update_(factor: Tensor, new: Tensor, rho: float) -> Tensor:
    """``factor <- rho * factor + (1 - rho) * new`` in place (``new`` cast to its dtype)."""
    return factor.mul_(rho).add_(new.to(factor.dtype), alpha=1 - rho)


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


def kfac_precondition(grad: Tensor, a_inv: Tensor, g_inv: Tensor) -> Tensor:
    """``G_inv [grad W, grad b] A_inv`` in the wider of the two inverses' dtypes."""
    work = torch.promote_types(a_inv.dtype, g_inv.dtype)
    return g_inv.to(work) @ grad.to(work) @ a_inv.to(work)


def validate_hyperparameters(h: dict[str, Any]) -> None:
    """Raise a ValueError naming the first invalid KFAC hyper-parameter in ``h``."""
    check_number("lr", h["lr"])
    check_number("momentum", h["momentum"], high=1.0)
    check_number("damping", h["damping"], low_open=True)
    check_number("weight_decay", h["weight_decay"])
    check_int("T", h["T"], low=1)
    check_number("ema_decay", h["ema_decay"], high=1.0)
    check_choice("inverse_method", h["inverse_method"], INVERSE_METHODS)
    check_choice("on_inverse_failure", h["on_inverse_failure"], INVERSE_FAILURE_POLICIES)
    check_choice("kfac_approx", h["kfac_approx"], KFAC_APPROXIMATIONS)
    check_choice("loss_average", h["loss_average"], LOSS_AVERAGES)
    resolve_dtype(h["factor_dtype"], "factor_dtype")
    resolve_dtype(h["inverse_dtype"], "inverse_dtype")
    check_bool("warn_unsupported", h["warn_unsupported"])


@dataclass(frozen=True)
class KFACConfig:
    """One param group's KFAC hyper-parameters, checked, with dtypes resolved."""

    lr: float
    momentum: float
    damping: float
    weight_decay: float
    T: int
    ema_decay: float
    inverse_method: str
    factor_dtype: torch.dtype | None
    inverse_dtype: torch.dtype | None
    on_inverse_failure: str
    kfac_approx: str
    loss_average: str | None
    warn_unsupported: bool
    first_order: FirstOrderConfig

    @classmethod
    def parse(cls, group: dict[str, Any]) -> KFACConfig:
        """The config of a group (ValueError naming a bad hyper-parameter)."""
        h = {k: group.get(k, DEFAULTS[k]) for k in _OWN}
        validate_hyperparameters(h)
        h["factor_dtype"] = resolve_dtype(h["factor_dtype"], "factor_dtype")
        h["inverse_dtype"] = resolve_dtype(h["inverse_dtype"], "inverse_dtype")
        return cls(**h, first_order=FirstOrderConfig.parse(group))


class KFAC(KroneckerOptimizer):
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
        fallback, fallback_lr, betas, eps, fallback_weight_decay, compensated: the
            first-order rule for the other parameters and 16-bit compensation, as in
            :class:`singd.SINGD`.

    All arguments except ``model`` and ``params`` are also per-param-group keys. Use
    :meth:`preconditioner_factors` and :meth:`state_bytes` to look at the state.
    """

    DEFAULTS = DEFAULTS
    _KEEP_DTYPE = (*KroneckerOptimizer._KEEP_DTYPE, "A", "G", "A_inv", "G_inv")
    _unscale_by_reciprocal = True
    _sparse_fallback_ok = True

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
        fallback: str = DEFAULTS["fallback"],
        fallback_lr: float | None = DEFAULTS["fallback_lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        eps: float = DEFAULTS["eps"],
        fallback_weight_decay: float = DEFAULTS["fallback_weight_decay"],
        compensated: bool = DEFAULTS["compensated"],
    ) -> None:
        arguments = dict(locals())
        #: the loss scale of the last GradScaler step: divides the statistics when
        #: ``scaler.unscale_(opt)`` ran first and the scaler hands over none
        self._last_scale = 1.0
        self._stats: dict[str, list[Tensor]] = {}
        super().__init__(model, params, {k: arguments[k] for k in DEFAULTS})

    # ------------------------------------------------------------------ base interface
    def _parse(self, group: dict[str, Any]) -> KFACConfig:
        """The group's :class:`KFACConfig`."""
        return KFACConfig.parse(group)

    def _new_layer(self, layer: Layer, group: dict) -> LayerRecord:
        """A layer record (its factors are made at its first update, in ``self.state``)."""
        return LayerRecord(layer, group)

    def _accumulate(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """Accumulate ``a^T a`` and ``g^T g`` (float32) of one forward/backward pass."""
        rec = self._layers[name]
        cfg = self._config(rec.group)
        module = rec.layer.module
        a = input_rows(module, x, cfg.kfac_approx).float()
        g = grad_rows(module, grad_output, cfg.kfac_approx).float()
        n = loss_average_count(module, grad_output, cfg.loss_average)
        aat, ggt = kronecker_statistics(a, g, n)
        acc = self._stats.get(name)
        if acc is None:
            self._stats[name] = [aat, ggt]
        else:
            acc[0] += aat
            acc[1] += ggt

    def _drop_statistics(self) -> None:
        """Forget the statistics gathered since the last step."""
        self._stats = {}

    # ------------------------------------------------------------------ state
    def _layer_state(self, layer: Layer, cfg: KFACConfig) -> dict[str, Any]:
        """The layer's factors and inverses in ``self.state`` (identities at first use)."""
        state = self.state[layer.weight]
        if "A" not in state:
            fdt = cfg.factor_dtype or layer.weight.dtype
            idt = cfg.inverse_dtype or fdt
            dev = layer.weight.device
            for f, d in (("A", layer.in_dim), ("G", layer.out_dim)):
                state[f] = torch.eye(d, dtype=fdt, device=dev)
                state[f"{f}_inv"] = torch.eye(d, dtype=idt, device=dev) / (1 + cfg.damping)
                state[f"{f}_upcasts"] = 0
            state["factor_updates"] = 0
        return state

    def _update_factors(
        self, layer: Layer, cfg: KFACConfig, aat: Tensor, ggt: Tensor, stat_scale: float
    ) -> None:
        """Fold this step's statistics into the EMA factors and recompute both inverses."""
        state = self._layer_state(layer, cfg)
        rho = cfg.ema_decay if state["factor_updates"] > 0 else 0.0
        stats = {"A": aat, "G": ggt / stat_scale**2 if stat_scale != 1.0 else ggt}
        for f in _FACTORS:
            ema_update_(state[f], stats[f], rho)
            inv, up = damped_inverse(
                state[f],
                cfg.damping,
                method=cfg.inverse_method,
                dtype=cfg.inverse_dtype or state[f].dtype,
                on_failure=cfg.on_inverse_failure,
                what=f"factor {f} of layer {layer.name!r}",
            )
            state[f"{f}_inv"] = inv
            if up is not None:
                state[f"{f}_upcasts"] += 1
            if inv.dtype != state[f].dtype:  # the inverse needed a wider working copy
                state[f"{f}_upcast_dtype"] = str(inv.dtype).removeprefix("torch.")
        state["factor_updates"] += 1

    # ------------------------------------------------------------------ step
    def _step_once(self, step: int, scales: AmpScales, configs: dict[int, KFACConfig]) -> None:
        """Update factors/inverses of the layers with statistics, then precondition."""
        # the gradients (and the captured g) are still scaled, unless the user called
        # scaler.unscale_(opt) first: then only the statistics are
        if scales.from_scaler:
            self._last_scale = scales.stat_div
        if scales.skip:
            return
        stat_scale = self._last_scale if scales.stat_div is None else scales.stat_div
        batches = {key: FirstOrderBatch([], []) for key in configs}
        for name, rec in self._layers.items():
            layer, cfg = rec.layer, configs[id(rec.group)]
            if name in self._stats:
                self._update_factors(layer, cfg, *self._stats[name], stat_scale)
            grad = layer.grad_matrix()
            if grad is None:
                continue
            state = self._layer_state(layer, cfg)
            pre = kfac_precondition(grad, state["A_inv"], state["G_inv"])
            if scales.grad_div != 1.0:
                pre.mul_(1.0 / scales.grad_div)
            batches[id(rec.group)].params.extend(layer.params())
            batches[id(rec.group)].directions.extend(
                d.to(layer.weight.dtype) for d in layer.split(pre)
            )
        fallback = {id(p) for p in self._fallback.values()}
        for group in self.param_groups:
            cfg, batch = configs[id(group)], batches[id(group)]
            rest = [p for p in group["params"] if id(p) in fallback]
            self._fallback_update(cfg, rest, scales.grad_div, batch)
            self._heavy_ball(cfg, batch)

    # ------------------------------------------------------------------ views
    def preconditioner_factors(self) -> dict[str, LayerFactors]:
        """Read-only views of A, G, A_inv, G_inv per layer (empty before the first step)."""
        out: dict[str, LayerFactors] = {}
        for name, rec in self._layers.items():
            state = self.state.get(rec.layer.weight, {})
            if "A" not in state:
                continue
            factors = {
                f: FactorView(state[f], "symmetric", "dense") for f in ("A", "G", "A_inv", "G_inv")
            }
            out[name] = LayerFactors(name, rec.layer.kind, factors)
        return out

    def _factor_bytes(self, name: str, rec: LayerRecord) -> dict[str, int]:
        """``A``, ``G``, ``A_inv``, ``G_inv``; ``A_upcast`` / ``G_upcast`` (the working copy
        of a factor in the wider dtype its inverse was computed in, by the upcast policy or
        by ``inverse_dtype``) when there was one."""

        def nbytes(t: Tensor) -> int:
            return t.numel() * t.element_size()

        state = self.state.get(rec.layer.weight, {})
        comps: dict[str, int] = {}
        for f in _FACTORS:
            if f in state:
                comps[f] = nbytes(state[f])
                comps[f"{f}_inv"] = nbytes(state[f"{f}_inv"])
                if f"{f}_upcast_dtype" in state:
                    up = FLOAT_DTYPES[state[f"{f}_upcast_dtype"]]
                    comps[f"{f}_upcast"] = state[f].numel() * torch.finfo(up).bits // 8
        return comps

    def upcast_count(self) -> int:
        """How many factor inverses so far needed an upcast (0 when every dtype worked)."""
        return sum(
            self.state[rec.layer.weight].get(f"{f}_upcasts", 0)
            for rec in self._layers.values()
            for f in _FACTORS
            if rec.layer.weight in self.state
        )

    # ------------------------------------------------------------------ checkpointing
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping each factor's own dtype (torch would cast it to the param's);
        the param groups' hyper-parameters are validated before anything changes."""
        self._check_loaded_groups(state_dict["param_groups"])
        super().load_state_dict(state_dict)
        self._keep_state_dtypes(state_dict)
        self._after_load()
        extra = state_dict.get("kfac", {})
        self._step = int(extra.get("step", self._step))
        self._last_scale = float(extra.get("last_scale", self._last_scale))
        self._stats = {}
        self._sync_hooks()

    def state_dict(self) -> dict[str, Any]:
        """The torch state dict plus ``"kfac"``: the step counter and the last loss scale."""
        sd = super().state_dict()
        sd["kfac"] = {"step": self._step, "last_scale": self._last_scale}
        return sd
