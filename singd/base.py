"""One base for the Kronecker-factored optimizers (:class:`singd.SINGD`, :class:`singd.KFAC`).

The base owns what does not depend on the preconditioner's math: finding the supported
layers and the parameters left to the first-order fallback, the capture hooks (attached only
before steps that collect statistics, removed with the optimizer), the fallback rule, the
GradScaler policy, the ``steps`` counter, ``state_bytes()`` and the hyper-parameter checks.
Each param group's hyper-parameters are parsed into a frozen config (a subclass's
:meth:`KroneckerOptimizer._parse`) and parsed again only when the group's values change.
See docs/architecture.md, 'singd: the optimizer'.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from singd.capture import (
    BASIC_KINDS,
    Capture,
    Layer,
    find_layers,
    unwrap_model,
    weak_method,
)
from singd.first_order import LOW_PRECISION, adam_directions_, add_, moment_dtype
from singd.update import heavy_ball_step_

# ---------------------------------------------------------------------- hyper-parameter checks


def is_number(x: object) -> bool:
    """Whether ``x`` is an int or float (a bool is not a number here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_number(
    key: str, value: object, *, low: float = 0.0, low_open: bool = False, high: float | None = None
) -> None:
    """Raise a ValueError naming ``key`` unless ``value`` is a number in the given range
    (``high`` is exclusive; ``low`` is exclusive with ``low_open``)."""
    ok = is_number(value) and (value > low if low_open else value >= low)
    ok = ok and (high is None or value < high)
    if ok:
        return
    if high is not None:
        rng = f"lie in {'(' if low_open else '['}{low:g}, {high:g})"
    else:
        rng = f"be {'>' if low_open else '>='} {low:g}"
    raise ValueError(f"{key} must {rng} (a number), got {value!r}")


def check_int(key: str, value: object, *, low: int, what: str = "") -> None:
    """Raise a ValueError naming ``key`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an int >= {low}{what}, got {value!r}")


def check_choice(key: str, value: object, valid: Sequence[object]) -> None:
    """Raise a ValueError naming ``key`` and the valid values unless ``value`` is one."""
    if value not in valid:
        raise ValueError(f"{key} must be one of {tuple(valid)}, got {value!r}")


def check_bool(key: str, value: object) -> None:
    """Raise a ValueError naming ``key`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")


# ---------------------------------------------------------------------- GradScaler policy


class AmpScales(NamedTuple):
    """What ``torch.amp.GradScaler`` handed to one ``step()``."""

    #: divisor of the parameter gradients (1.0 without a scaler or after ``unscale_``)
    grad_div: float
    #: divisor of the captured statistics; None when unknown (``scaler.unscale_(opt)`` ran
    #: first and the scaler handed over no scale)
    stat_div: float | None
    #: the scaler found inf/NaN gradients: nothing may change this step
    skip: bool
    #: a GradScaler handed over its scale (``grad_scale``) this step
    from_scaler: bool = False


def amp_scales(optimizer: Optimizer) -> AmpScales:
    """The scales a GradScaler set on ``optimizer`` (``grad_scale``, ``found_inf``)."""
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:  # no GradScaler involved
        return AmpScales(1.0, 1.0, False)
    skip = bool(float(found_inf) > 0)
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        scale = float(grad_scale)
        return AmpScales(scale, scale, skip, True)
    # scaler.unscale_(opt) ran: gradients are unscaled, statistics are not
    return AmpScales(1.0, None, skip)


# ---------------------------------------------------------------------- first-order fallback

#: Hyper-parameters of the first-order rules, shared by SINGD and KFAC (also group keys):
#: the fallback rule for parameters no factor preconditions, its learning rate (None: the
#: group's lr), Adam's betas and eps (the ``"adamw"`` fallback, and SINGD's Adam grafting),
#: the AdamW fallback's decoupled weight decay, and Kahan-compensated 16-bit updates.
FIRST_ORDER_DEFAULTS: dict[str, Any] = {
    "fallback": "adamw",
    "fallback_lr": None,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "fallback_weight_decay": 1e-2,
    "compensated": False,
}


@dataclass(frozen=True)
class FirstOrderConfig:
    """One param group's first-order hyper-parameters, checked."""

    fallback: str
    fallback_lr: float | None
    betas: tuple[float, float]
    eps: float
    fallback_weight_decay: float
    compensated: bool

    @classmethod
    def parse(cls, group: dict[str, Any]) -> FirstOrderConfig:
        """The first-order config of a group (ValueError naming a bad hyper-parameter)."""
        h = {k: group.get(k, v) for k, v in FIRST_ORDER_DEFAULTS.items()}
        check_choice("fallback", h["fallback"], tuple(FALLBACK_RULES))
        if h["fallback_lr"] is not None:
            check_number("fallback_lr", h["fallback_lr"])
        betas = h["betas"]
        if isinstance(betas, str) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
        for b in betas:
            check_number("betas entries", b, high=1.0)
        check_number("eps", h["eps"], low_open=True)
        check_number("fallback_weight_decay", h["fallback_weight_decay"])
        check_bool("compensated", h["compensated"])
        h["betas"] = (float(betas[0]), float(betas[1]))
        return cls(**h)


@dataclass
class FirstOrderBatch:
    """Parameters and update directions of one param group for one heavy-ball update (the
    preconditioned layers' and the fallback's share one foreach call). ``units`` names, per
    parameter, the layer it belongs to (parameters of one unit are rescaled together by
    SINGD's grafting; None: each parameter is its own unit)."""

    params: list[Tensor]
    directions: list[Tensor]
    units: list[int] | None = None

    def add(self, params: Iterable[Tensor], directions: Iterable[Tensor]) -> None:
        """Append parameters with their directions as one unit."""
        params, directions = list(params), list(directions)
        if self.units is not None:
            unit = (self.units[-1] + 1) if self.units else 0
            self.units.extend([unit] * len(params))
        self.params.extend(params)
        self.directions.extend(directions)


def compensation_buffers(state: dict, params: Sequence[Tensor]) -> list[Tensor | None]:
    """The Kahan compensation buffer of each 16-bit parameter in ``state`` (made at zero on
    first use), None for wider ones (they lose nothing worth the memory)."""
    out: list[Tensor | None] = []
    for p in params:
        if p.dtype not in LOW_PRECISION:
            out.append(None)
            continue
        st = state[p]
        comp = st.get("compensation")
        if comp is None or comp.dtype != p.dtype or comp.device != p.device:
            comp = st["compensation"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        out.append(comp)
    return out


class FallbackRule:
    """How parameters outside supported layers are trained (one rule per name in
    :data:`FALLBACK_RULES`). ``update`` gets the group's parameters that have a gradient and
    their unscaled gradients (possibly the ``.grad`` tensors themselves: copy before changing
    them in place) and either updates them itself or adds them to ``batch``."""

    #: what the fallback warning says the parameters are trained by
    description: ClassVar[str] = ""
    #: whether the rule changes the parameters at all
    trains: ClassVar[bool] = True

    def update(
        self,
        state: dict,
        params: list[Tensor],
        grads: list[Tensor],
        config: Any,
        batch: FirstOrderBatch,
    ) -> None:
        """Update ``params`` from ``grads`` (the group's ``config`` holds its
        hyper-parameters) or hand them to the group's heavy-ball ``batch``."""
        raise NotImplementedError


class HeavyBallFallback(FallbackRule):
    """The raw-gradient heavy-ball rule with the group's lr, momentum and weight decay (the
    preconditioned layers' rule without the preconditioner)."""

    description = "heavy-ball on the raw gradient"

    def update(
        self,
        state: dict,
        params: list[Tensor],
        grads: list[Tensor],
        config: Any,
        batch: FirstOrderBatch,
    ) -> None:
        """Join the layers' heavy-ball update of the group (each parameter its own unit)."""
        for p, g in zip(params, grads):
            batch.add([p], [g])


class AdamWFallback(FallbackRule):
    """AdamW with the group's ``fallback_lr`` (None: its lr), ``betas``, ``eps`` and
    ``fallback_weight_decay`` (decoupled, as in ``torch.optim.AdamW``). Moments are float32
    for 16-bit parameters; each parameter counts its own Adam steps (skipped GradScaler
    steps do not count)."""

    description = "AdamW"

    def update(
        self,
        state: dict,
        params: list[Tensor],
        grads: list[Tensor],
        config: Any,
        batch: FirstOrderBatch,
    ) -> None:
        """One AdamW step of ``params`` (compensated where the group asks for it)."""
        first = config.first_order
        lr = config.lr if first.fallback_lr is None else first.fallback_lr
        directions = adam_update_directions(state, params, grads, first)
        if first.fallback_weight_decay != 0.0:
            wide = [p if p.dtype == d.dtype else p.to(d.dtype) for p, d in zip(params, directions)]
            torch._foreach_add_(directions, wide, alpha=first.fallback_weight_decay)
        comps = compensation_buffers(state, params) if first.compensated else None
        add_(params, directions, alpha=-lr, compensations=comps)


class NoFallback(FallbackRule):
    """Leave the parameters as they are (the reference package's behaviour)."""

    description = "nothing: fallback='none' leaves them untrained"
    trains = False

    def update(
        self,
        state: dict,
        params: list[Tensor],
        grads: list[Tensor],
        config: Any,
        batch: FirstOrderBatch,
    ) -> None:
        """Do nothing."""


def adam_moments(state: dict, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Adam's first and second moments of ``params`` in ``state`` (zero on first use, in
    :func:`singd.first_order.moment_dtype`)."""
    firsts, seconds = [], []
    for p in params:
        st = state[p]
        if "exp_avg" not in st:
            dtype = moment_dtype(p)
            st["exp_avg"] = torch.zeros_like(p, dtype=dtype)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype)
        firsts.append(st["exp_avg"])
        seconds.append(st["exp_avg_sq"])
    return firsts, seconds


def adam_update_directions(
    state: dict, params: Sequence[Tensor], grads: Sequence[Tensor], first: FirstOrderConfig
) -> list[Tensor]:
    """Advance each parameter's Adam moments and step count in ``state`` with ``grads`` and
    return Adam's directions ``m_hat / (sqrt(v_hat) + eps)`` (in the moments' dtype)."""
    firsts, seconds = adam_moments(state, params)
    by_step: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        state[p]["adam_step"] = state[p].get("adam_step", 0) + 1
        by_step.setdefault(state[p]["adam_step"], []).append(i)
    out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for step, idx in by_step.items():
        directions = adam_directions_(
            [grads[i] for i in idx],
            [firsts[i] for i in idx],
            [seconds[i] for i in idx],
            step=step,
            betas=first.betas,
            eps=first.eps,
        )
        for i, d in zip(idx, directions):
            out[i] = d
    return out


#: Fallback rules by name (a param group's ``fallback`` key selects one).
FALLBACK_RULES: dict[str, FallbackRule] = {
    "adamw": AdamWFallback(),
    "heavy_ball": HeavyBallFallback(),
    "none": NoFallback(),
}
#: Per-parameter state of the first-order rules -> its component name in ``state_bytes``.
_PARAM_STATE = {
    "momentum_buffer": "momentum",
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "compensation": "compensation",
}


# ---------------------------------------------------------------------- the base class


@dataclass
class LayerRecord:
    """A supported layer and the param group (a dict of the optimizer's) it belongs to."""

    layer: Layer
    group: dict


class KroneckerOptimizer(Optimizer):
    """Base of the optimizers that precondition ``nn.Linear``/``nn.Conv2d`` layers by
    Kronecker factors built from statistics captured during backward.

    Subclasses set :attr:`DEFAULTS` and implement :meth:`_parse` (a group -> its frozen
    config, raising a ValueError naming a bad hyper-parameter), :meth:`_new_layer`,
    :meth:`_accumulate` (one backward pass of one layer), :meth:`_drop_statistics`,
    :meth:`_step_once` and :meth:`_factor_bytes`.
    """

    #: GradScaler hands over ``grad_scale`` and ``found_inf`` and always calls ``step``.
    _step_supports_amp_scaling = True
    #: hyper-parameters and their defaults (also the param-group keys)
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: unscale gradients by multiplying with ``1 / scale`` (else by dividing by ``scale``)
    _unscale_by_reciprocal: ClassVar[bool] = False
    #: layer kinds preconditioned (see :data:`singd.capture.LAYER_KINDS`)
    LAYER_KINDS: ClassVar[tuple[str, ...]] = BASIC_KINDS
    #: whether fallback parameters may have sparse gradients
    _sparse_fallback_ok: ClassVar[bool] = False
    #: state entries kept in their saved dtype on load (torch casts state to the parameter's):
    #: float32 Adam moments of 16-bit parameters
    _KEEP_DTYPE: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        defaults: dict[str, Any],
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self._parse(defaults)  # the constructor arguments, before anything is built
        inner = unwrap_model(model)
        if params is None:
            params = [p for p in inner.parameters() if p.requires_grad]
            if not params:
                raise ValueError(
                    "model has no trainable parameter (requires_grad=True): nothing to optimize"
                )
        else:
            params = list(params)
            if not params:
                raise ValueError(
                    "params is empty: pass None (all trainable parameters of model) or a "
                    "non-empty list"
                )
        self._ready = False
        self._model = inner
        self._configs: dict[int, tuple[tuple, Any]] = {}
        self._layers: dict[str, Any] = {}
        self._fallback: dict[str, nn.Parameter] = {}
        super().__init__(params, defaults)
        self._setup(self.param_groups)
        self._step = 0
        self._warned_unfired: set[str] = set()
        # the hooks hold the optimizer weakly and disappear with it
        self._capture = Capture(
            {name: st.layer.module for name, st in self._layers.items()},
            weak_method(self._on_backward),
        )
        weakref.finalize(self, self._capture.detach)
        self._ready = True
        self._sync_hooks()

    # ------------------------------------------------------------------ subclass interface
    def _parse(self, group: dict[str, Any]) -> Any:
        """The frozen config of a group's hyper-parameters (ValueError naming a bad one)."""
        raise NotImplementedError

    def _new_layer(self, layer: Layer, group: dict) -> Any:
        """The per-layer state of a new supported layer (has ``.layer`` and ``.group``)."""
        raise NotImplementedError

    def _accumulate(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """Add one backward pass's statistics of layer ``name`` (runs without autograd)."""
        raise NotImplementedError

    def _drop_statistics(self) -> None:
        """Forget statistics gathered since the last step."""
        raise NotImplementedError

    def _step_once(self, step: int, scales: AmpScales, configs: dict[int, Any]) -> None:
        """Update the preconditioner (where due) and the parameters for step ``step``
        (``configs``: ``id(group) -> config`` of every group)."""
        raise NotImplementedError

    def _factor_bytes(self, name: str, st: Any) -> dict[str, int]:
        """Bytes of a layer's preconditioner state by component (without momentum)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ configs
    def _config(self, group: dict) -> Any:
        """The group's frozen config, parsed again only when one of its values changed
        (LR schedulers write ``group["lr"]`` between steps)."""
        values = tuple(map(group.__getitem__, self.DEFAULTS))
        cached = self._configs.get(id(group))
        if cached is not None and cached[0] == values:
            return cached[1]
        cfg = self._parse(group)
        self._configs[id(group)] = (values, cfg)
        return cfg

    def _group_configs(self) -> dict[int, Any]:
        """``id(group) -> config`` of every param group (for one step)."""
        return {id(g): self._config(g) for g in self.param_groups}

    # ------------------------------------------------------------------ setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (hyper-parameters validated first; its layers get state)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        unknown = set(merged) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown param group keys {sorted(unknown)}; valid keys: {sorted(self.DEFAULTS)}"
            )
        group = self._normalize_group(param_group, self._parse(merged))
        if not getattr(self, "_ready", False):
            super().add_param_group(group)
            return
        # after construction: check the new group against the model before adding it
        snapshot = list(self.param_groups)
        super().add_param_group(group)
        try:
            self._setup([self.param_groups[-1]])
        except Exception:
            self.param_groups[:] = snapshot
            raise
        self._capture.modules.update({name: st.layer.module for name, st in self._layers.items()})
        self._sync_hooks()

    def _normalize_group(self, param_group: dict[str, Any], cfg: Any) -> dict[str, Any]:
        """The group dict to store (a subclass may write normalised values from ``cfg``)."""
        return dict(param_group)

    def _setup(self, groups: list[dict]) -> None:
        """Create layer states and fallback lists for ``groups`` (validated before mutating)."""
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        model_params = {id(p) for p in self._model.parameters()}
        if not {id(p) for g in groups for p in g["params"]} <= model_params:
            raise ValueError("params contains tensors that are not parameters of model")
        search = find_layers(
            self._model, [p for g in groups for p in g["params"]], self.LAYER_KINDS
        )
        layers = {}
        for name, layer in search.layers.items():
            group = group_of[id(layer.weight)]
            if layer.bias is not None and group_of.get(id(layer.bias)) is not group:
                where = (
                    "is missing from params"
                    if id(layer.bias) not in group_of
                    else ("is in a different param group")
                )
                raise ValueError(
                    f"weight and bias of layer {name!r} must be in the same param group "
                    f"(its bias {where})"
                )
            layers[name] = self._new_layer(layer, group)
        noisy: dict[str, list[str]] = {}
        for n, (p, reason) in search.others.items():
            group = group_of[id(p)]
            if group["warn_unsupported"]:
                rule = FALLBACK_RULES[self._config(group).first_order.fallback]
                noisy.setdefault(rule.description, []).append(f"{n} ({reason})")
        self._layers.update(layers)
        self._fallback.update({n: p for n, (p, _) in search.others.items()})
        for description, names in noisy.items():
            warnings.warn(
                f"{type(self).__name__} preconditions {', '.join(self.LAYER_KINDS)} layers; "
                f"these parameters are trained by the first-order fallback ({description}): "
                + ", ".join(names),
                UserWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ hooks
    def _sync_hooks(self, configs: dict[int, Any] | None = None) -> None:
        """Attach hooks exactly to the layers that collect statistics before the next step
        (``configs``: :meth:`_group_configs`, when the caller has them)."""
        step = self._step
        configs = self._group_configs() if configs is None else configs
        self._capture.attach(
            n for n, st in self._layers.items() if self._due(configs[id(st.group)], step)
        )
        self._capture.clear_fired()

    @staticmethod
    def _due(cfg: Any, step: int) -> bool:
        """Whether a group with config ``cfg`` updates its preconditioner at ``step``."""
        return step % cfg.T == 0

    def remove_hooks(self) -> None:
        """Remove all hooks from the model (the factors then stay as they are)."""
        self._capture.detach()

    def _on_backward(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """The capture callback: accumulate one backward pass without autograd recording."""
        if torch.is_grad_enabled():  # backward(create_graph=True): record nothing
            with torch.no_grad():
                self._accumulate(name, x, grad_output)
        else:  # a plain backward already runs without grad: skip the context's cost
            self._accumulate(name, x, grad_output)

    def _check_unfired(self, name: str, st: Any) -> None:
        """Warn once about a layer with gradients whose hooks never saw a forward pass."""
        if name in self._warned_unfired or name in self._capture.fired:
            return
        g = st.layer.weight.grad
        if g is None or not bool(g.any()):
            return
        self._warned_unfired.add(name)
        warnings.warn(
            f"{type(self).__name__}: layer {name!r} has gradients but its forward hook never "
            "ran (its forward is bypassed); its factors stay as they are",
            UserWarning,
            stacklevel=5,
        )

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop the statistics gathered with them."""
        self._drop_statistics()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One step: preconditioner update on due steps, then the parameter update; a
        GradScaler step with inf/NaN gradients changes nothing but the step counter."""
        if closure is not None:
            raise ValueError(
                f"{type(self).__name__}.step does not take a closure (closure must be None): "
                "run forward and backward, then call step()"
            )
        scales = self._amp_scales()
        step = self._step
        configs = self._group_configs()
        self._step_once(step, scales, configs)
        self._drop_statistics()
        self._step = step + 1
        self._sync_hooks(configs)

    def _amp_scales(self) -> AmpScales:
        """This step's GradScaler scales (see :func:`amp_scales`)."""
        return amp_scales(self)

    def _unscaled(self, grad: Tensor, grad_div: float) -> Tensor:
        """``grad`` unscaled by ``grad_div`` as a new tensor."""
        return grad * (1.0 / grad_div) if self._unscale_by_reciprocal else grad / grad_div

    def _fallback_update(
        self, cfg: Any, params: Iterable[Tensor], grad_div: float, batch: FirstOrderBatch
    ) -> None:
        """Train ``params`` (those of them with a gradient) by the fallback rule of the
        group whose config is ``cfg``."""
        rule = FALLBACK_RULES[cfg.first_order.fallback]
        if not rule.trains:
            return
        todo, grads = [], []
        copy = cfg.weight_decay != 0.0  # the heavy-ball rule adds it in place
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse and not self._sparse_fallback_ok:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients "
                    "(Embedding(sparse=True))"
                )
            if grad_div != 1.0:
                d = self._unscaled(p.grad, grad_div)
            else:
                d = p.grad.clone() if copy else p.grad
            todo.append(p)
            grads.append(d)
        if todo:
            rule.update(self.state, todo, grads, cfg, batch)

    def _heavy_ball(self, cfg: Any, batch: FirstOrderBatch) -> None:
        """The heavy-ball update of a group's batch with its config's lr, momentum and
        weight decay."""
        if batch.params:
            heavy_ball_step_(
                self.state,
                batch.params,
                batch.directions,
                lr=cfg.lr,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                compensations=self._compensations(cfg, batch.params),
            )

    def _compensations(self, cfg: Any, params: Sequence[Tensor]) -> list[Tensor | None] | None:
        """The Kahan buffers of ``params`` where the group asks for compensation, else None."""
        if not cfg.first_order.compensated:
            return None
        return compensation_buffers(self.state, params)

    # ------------------------------------------------------------------ views
    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far (skipped GradScaler steps included)."""
        return self._step

    def fallback_parameters(self) -> dict[str, nn.Parameter]:
        """Qualified name -> parameter trained by the first-order fallback."""
        return dict(self._fallback)

    def _buffer_bytes(self, params: Iterable[Tensor], seen: set[int]) -> dict[str, int]:
        """Bytes of the per-parameter state of ``params`` by component: ``momentum``
        (heavy-ball buffers), ``exp_avg``/``exp_avg_sq`` (Adam moments of the fallback or of
        grafting), ``compensation`` (Kahan buffers). A parameter in ``seen`` is not counted
        again (a packed attention weight belongs to three layers)."""
        out = {"momentum": 0}
        for p in params:
            if id(p) in seen or p not in self.state:
                continue
            seen.add(id(p))
            for key, name in _PARAM_STATE.items():
                value = self.state[p].get(key)
                if isinstance(value, Tensor):
                    out[name] = out.get(name, 0) + value.numel() * value.element_size()
        return out

    def state_bytes(self) -> dict[str, dict[str, int]]:
        """Optimizer-state bytes: layer (or ``"fallback"``) -> component -> bytes; the
        components are the subclass's factors plus the per-parameter state (see
        :meth:`_buffer_bytes`)."""
        out: dict[str, dict[str, int]] = {}
        seen: set[int] = set()
        for name, st in self._layers.items():
            entry = self._factor_bytes(name, st)
            entry.update(self._buffer_bytes(st.layer.params(), seen))
            out[name] = entry
        if self._fallback:
            out["fallback"] = self._buffer_bytes(self._fallback.values(), seen)
        return out

    def _keep_state_dtypes(self, state_dict: dict[str, Any]) -> None:
        """After ``Optimizer.load_state_dict`` (which casts state to each parameter's dtype):
        put the entries named in :attr:`_KEEP_DTYPE` back in their saved dtype."""
        params = [p for g in self.param_groups for p in g["params"]]
        for index, saved in state_dict["state"].items():
            p = params[index]
            for key in self._KEEP_DTYPE:
                if isinstance(saved.get(key), Tensor) and p in self.state:
                    self.state[p][key] = saved[key].to(device=p.device, copy=True)

    # ------------------------------------------------------------------ state dict
    def _check_loaded_groups(
        self, groups: list[dict[str, Any]], fix: Callable[[dict, dict], dict] | None = None
    ) -> None:
        """Validate the param groups of a state dict before anything is loaded (``fix``
        maps a saved group and the current one to the group as it will be stored)."""
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for saved, current in zip(groups, self.param_groups):
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k in self.DEFAULTS}}
            self._parse(fix(merged, current) if fix is not None else merged)

    def _after_load(self) -> None:
        """Point layer states at the loaded group dicts, fill keys older state dicts lack,
        forget the cached configs."""
        for g in self.param_groups:
            for key, value in self.defaults.items():
                g.setdefault(key, value)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for st in self._layers.values():
            st.group = group_of[id(st.layer.weight)]
        self._configs.clear()
