"""SINGD: structured inverse-free natural gradient descent (Lin et al., ICML 2024).

A thin ``torch.optim.Optimizer`` over :mod:`singd.update` (the math) and
:mod:`singd.capture` (the layer hooks). See DESIGN sections 2 and 3 and the class docstring.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from singd.capture import (
    KFAC_APPROXIMATIONS,
    LOSS_AVERAGES,
    Capture,
    Layer,
    conv_input_gram,
    conv_row_count,
    find_layers,
    grad_rows,
    grad_square_sums,
    input_rows,
    input_square_sums,
    loss_average_count,
    unwrap_model,
    weak_method,
)
from singd.distributed import default_reducer
from singd.dtypes import FLOAT_DTYPES, resolve_dtype
from singd.structures import FORMS, BlockDiagonal, Diagonal, StructuredMatrix, structure
from singd.update import (
    Gram,
    diagonal_statistic,
    diagonal_steps,
    gram,
    gram_route,
    heavy_ball_step_,
    inner_statistic,
    precondition,
    precondition_diagonal,
    riemannian_step,
)
from singd.views import FactorView, LayerFactors

#: Hyper-parameters and their defaults (also the per-param-group keys).
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.9,
    "damping": 1e-3,
    "alpha1": 0.5,
    "weight_decay": 0.0,
    "T": 10,
    "lr_cov": 1e-2,
    "structures": ("dense", "dense"),
    "kfac_approx": "expand",
    "warn_unsupported": True,
    "kfac_like": False,
    "preconditioner_dtype": (None, None),
    "init_grad_scale": 1.0,
    "normalize_lr_cov": False,
    "loss_average": "batch",
}

_CALLABLE = "<callable: not saved>"


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_hyperparameters(h: dict[str, Any]) -> dict[str, Any]:
    """Check SINGD hyper-parameters; return a copy with ``structures`` and
    ``preconditioner_dtype`` normalised to tuples. Raises ValueError/TypeError naming the
    argument and its valid values."""
    h = dict(h)
    for key in ("lr", "weight_decay"):
        v = h[key]
        if not _is_number(v) or not v >= 0:
            raise ValueError(f"{key} must be a number >= 0, got {v!r}")
    lr_cov = h["lr_cov"]
    if not callable(lr_cov) and (not _is_number(lr_cov) or not lr_cov >= 0):
        raise ValueError(
            f"lr_cov must be a number >= 0 or a callable step -> float, got {lr_cov!r}"
        )
    damping = h["damping"]
    if not _is_number(damping) or not damping > 0:
        raise ValueError(f"damping must be a number > 0, got {damping!r}")
    for key in ("momentum", "alpha1"):
        v = h[key]
        if not _is_number(v) or not 0 <= v < 1:
            raise ValueError(f"{key} must be a number in [0, 1), got {v!r}")
    T = h["T"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(
            f"T must be an int >= 1 (update the preconditioner every T steps), got {T!r}"
        )
    scale = h["init_grad_scale"]
    if not _is_number(scale) or not scale > 0:
        raise ValueError(f"init_grad_scale must be a number > 0, got {scale!r}")
    structures = h["structures"]
    if isinstance(structures, str) or not isinstance(structures, (tuple, list)):
        raise ValueError(
            f"structures must be a pair (structure of K, structure of C), e.g. "
            f"('dense', 'diagonal'), got {structures!r}"
        )
    if len(structures) != 2:
        raise ValueError(
            f"structures must have length 2 (K, C), got length {len(structures)}: {structures!r}"
        )
    for s in structures:
        try:
            structure(s)
        except (ValueError, TypeError) as err:
            raise ValueError(f"structures: {err} (valid forms: {', '.join(FORMS)})") from None
    h["structures"] = tuple(structures)
    if h["kfac_approx"] not in KFAC_APPROXIMATIONS:
        raise ValueError(
            f"kfac_approx must be one of {KFAC_APPROXIMATIONS}, got {h['kfac_approx']!r}"
        )
    if h["loss_average"] not in LOSS_AVERAGES:
        raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {h['loss_average']!r}")
    dtypes = h["preconditioner_dtype"]
    if not isinstance(dtypes, (tuple, list)) or len(dtypes) != 2:
        raise ValueError(
            f"preconditioner_dtype must be a pair (dtype of K, dtype of C) of None or one of "
            f"{list(FLOAT_DTYPES)}, got {dtypes!r}"
        )
    h["preconditioner_dtype"] = tuple(
        resolve_dtype(d, "preconditioner_dtype entries") for d in dtypes
    )
    for key in ("kfac_like", "normalize_lr_cov", "warn_unsupported"):
        if not isinstance(h[key], bool):
            raise ValueError(f"{key} must be True or False, got {h[key]!r}")
    return h


class _Accumulator:
    """A weighted sum ``coef * acc`` of statistics over backward passes, plus a row count.

    ``square_sums``: the terms are a diagonal factor's column sums of squares of the data,
    still to be multiplied by the squared factor entries (done once, at the update).
    """

    __slots__ = ("acc", "coef", "count", "square_sums")

    def __init__(self, square_sums: bool = False) -> None:
        self.acc: StructuredMatrix | None = None
        self.coef = 1.0
        self.count = 0
        self.square_sums = square_sums

    def add(self, term: StructuredMatrix, weight: float, count: int) -> None:
        """Add ``weight * term`` (``term`` is consumed) and ``count`` rows / loss terms."""
        if self.acc is None:
            self.acc, self.coef = term, weight
        else:
            self.acc.add_(term, alpha=weight / self.coef)
        self.count += count

    def value_and_scale(self, factor: float) -> tuple[StructuredMatrix, float]:
        """``(acc, s)`` with ``s * acc`` the statistic times ``factor`` (no copy, no op)."""
        return self.acc, factor * self.coef


_FULL = (torch.float32, torch.float64)


def _materialize(S: StructuredMatrix, scale: float, dtype: torch.dtype) -> StructuredMatrix:
    """``scale * S`` in ``dtype`` (scaled in S's dtype first, which is fp32 for fp16 factors)."""
    if scale != 1.0:
        S = S.mul_(scale)
    return S if S.dtype == dtype else S.to(dtype=dtype)


@dataclass
class _LayerState:
    """Per-layer optimizer state: factors, momenta, caches and pending statistics."""

    layer: Layer
    group: dict
    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix | None = None
    m_C: StructuredMatrix | None = None
    gram_K: Gram | None = None
    gram_C: Gram | None = None
    acc_K: _Accumulator | None = None
    acc_C: _Accumulator | None = None
    #: What :meth:`SINGD._follow` last checked: (weight dtype, weight device, the group's
    #: preconditioner_dtype, K, C); while it is unchanged there is nothing to move.
    followed: tuple | None = None


class SINGD(Optimizer):
    """Structured inverse-free natural gradient descent.

    ``SINGD(model, params=None, lr=1e-3, momentum=0.9, damping=1e-3, alpha1=0.5,
    weight_decay=0.0, T=10, lr_cov=1e-2, structures=("dense", "dense"),
    kfac_approx="expand", warn_unsupported=True, kfac_like=False,
    preconditioner_dtype=(None, None), init_grad_scale=1.0, normalize_lr_cov=False,
    loss_average="batch")`` (names and meaning as in the reference ``singd`` package); every
    hyper-parameter is also a per-param-group key.

    * ``nn.Linear`` (any leading dims) and ``nn.Conv2d`` layers are preconditioned by
      ``(K K^T) kron (C C^T)``; K and C live in ``structures`` (see
      :mod:`singd.structures`) and in ``preconditioner_dtype`` (None: the parameter dtype).
      Statistics are gathered on steps where ``step % T == 0`` by hooks that exist only on
      those steps; they sum over all backward passes since the last ``step()`` /
      ``zero_grad()`` (gradient accumulation, mean or sum reduction).
    * **First-order fallback**: every other trainable parameter (LayerNorm, Embedding,
      BatchNorm, free ``nn.Parameter``s, ``nn.MultiheadAttention`` in-projection and its
      ``out_proj``, tied weights, layers with a frozen weight or bias) gets the same
      heavy-ball update on its raw gradient: ``s = grad + weight_decay * p``,
      ``buf = momentum * buf + s``, ``p -= lr * buf``. One warning lists them
      (``warn_unsupported=False`` silences it).
    * ``torch.amp.GradScaler``: use ``scaler.step(opt)``. SINGD unscales gradients and
      statistics itself; a step with inf/NaN gradients changes nothing, drops the statistics
      and still advances the step counter. The statistics are captured during backward, still
      scaled; SINGD divides them by the scale that ``scaler.step`` hands over (fp16 factors:
      rows are normalised to max |g| = 1 before they meet fp16, so nothing overflows). If you
      call ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (gradient clipping) the
      scaler hands over no scale: the statistics are then divided by the group's
      ``init_grad_scale`` (a warning says so), which you keep equal to
      ``scaler.get_scale()`` in that pattern.
    * Data parallel: wrap the model in DDP before or after; SINGD hooks the inner module.
      With ``torch.distributed`` initialised (more than one rank) ``reduce_statistics`` is a
      :class:`singd.distributed.StatisticsReducer`: on update steps the statistics of all
      layers are averaged across ranks (``H_C`` summed for ``loss_average=None``) in one
      bucketed collective, so K and C stay identical on every rank. Replace it by any
      ``reduce(tensors, average)`` callable, or None for rank-local statistics.
    * ``preconditioner_factors()`` and ``state_bytes()`` are the read-only views used by
      diagnostics.
    """

    #: GradScaler hands over ``grad_scale`` and ``found_inf`` and always calls ``step``.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        lr: float = DEFAULTS["lr"],
        momentum: float = DEFAULTS["momentum"],
        damping: float = DEFAULTS["damping"],
        alpha1: float = DEFAULTS["alpha1"],
        weight_decay: float = DEFAULTS["weight_decay"],
        T: int = DEFAULTS["T"],
        lr_cov: float | Callable[[int], float] = DEFAULTS["lr_cov"],
        structures: tuple[str, str] = DEFAULTS["structures"],
        kfac_approx: str = DEFAULTS["kfac_approx"],
        warn_unsupported: bool = DEFAULTS["warn_unsupported"],
        kfac_like: bool = DEFAULTS["kfac_like"],
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = DEFAULTS[
            "preconditioner_dtype"
        ],
        init_grad_scale: float = DEFAULTS["init_grad_scale"],
        normalize_lr_cov: bool = DEFAULTS["normalize_lr_cov"],
        loss_average: str | None = DEFAULTS["loss_average"],
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        defaults = validate_hyperparameters(
            {
                "lr": lr,
                "momentum": momentum,
                "damping": damping,
                "alpha1": alpha1,
                "weight_decay": weight_decay,
                "T": T,
                "lr_cov": lr_cov,
                "structures": structures,
                "kfac_approx": kfac_approx,
                "warn_unsupported": warn_unsupported,
                "kfac_like": kfac_like,
                "preconditioner_dtype": preconditioner_dtype,
                "init_grad_scale": init_grad_scale,
                "normalize_lr_cov": normalize_lr_cov,
                "loss_average": loss_average,
            }
        )
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
        super().__init__(params, defaults)
        self._layers: dict[str, _LayerState] = {}
        self._fallback: dict[str, nn.Parameter] = {}
        self._setup(self.param_groups)
        self._step = 0
        self._last_scale: float | None = None
        self._warned_unfired: set[str] = set()
        self._warned_unscale = False
        #: ``reduce(tensors, average)``: in place across ranks, the mean where ``average[i]``,
        #: else the sum (see :mod:`singd.distributed`); None: statistics stay rank-local.
        self.reduce_statistics: Callable[[list[Tensor], list[bool]], None] | None
        self.reduce_statistics = default_reducer(model)
        # the hooks hold the optimizer weakly and disappear with it
        self._capture = Capture(
            {name: st.layer.module for name, st in self._layers.items()},
            weak_method(self._on_backward),
        )
        weakref.finalize(self, self._capture.detach)
        self._ready = True
        self._sync_hooks()

    # ------------------------------------------------------------------ setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (hyper-parameters validated first; its layers get factors)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        unknown = set(merged) - set(DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown param group keys {sorted(unknown)}; valid keys: {sorted(DEFAULTS)}"
            )
        checked = validate_hyperparameters(merged)
        if checked["kfac_like"] and checked["alpha1"] > 0:
            warnings.warn(
                f"kfac_like=True (IKFAC) uses no Riemannian momentum: alpha1={checked['alpha1']} "
                "is ignored (pass alpha1=0 to silence this warning)",
                UserWarning,
                stacklevel=3,
            )
        group = dict(param_group)
        for key in ("structures", "preconditioner_dtype"):
            if key in group:
                group[key] = checked[key]
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

    def _setup(self, groups: list[dict]) -> None:
        """Create layer states and fallback lists for ``groups`` (validated before mutating)."""
        group_of: dict[int, dict] = {}
        for group in self.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
        model_params = {id(p) for p in self._model.parameters()}
        new_ids = {id(p) for g in groups for p in g["params"]}
        if not new_ids <= model_params:
            raise ValueError("params contains tensors that are not parameters of model")
        search = find_layers(self._model, [p for g in groups for p in g["params"]])
        layers: dict[str, _LayerState] = {}
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
            layers[name] = self._new_layer_state(layer, group)
        fallback = {n: p for n, (p, _) in search.others.items()}
        noisy = [
            f"{n} ({reason})"
            for n, (p, reason) in search.others.items()
            if group_of[id(p)]["warn_unsupported"]
        ]
        self._layers.update(layers)
        self._fallback.update(fallback)
        if noisy:
            warnings.warn(
                "SINGD preconditions only nn.Linear and nn.Conv2d layers; these parameters "
                "are trained by the first-order fallback (heavy-ball on the raw gradient): "
                + ", ".join(noisy),
                UserWarning,
                stacklevel=3,
            )

    def _dtypes(self, st_or_layer: Layer, group: dict) -> tuple[torch.dtype, torch.dtype]:
        """The K and C dtypes of a layer in a group."""
        w = st_or_layer.weight
        dk, dc = group["preconditioner_dtype"]
        return (dk or w.dtype, dc or w.dtype)

    def _new_layer_state(self, layer: Layer, group: dict) -> _LayerState:
        """Identity factors (zero momenta when alpha1 > 0) for a layer."""
        clsK, clsC = (structure(s) for s in group["structures"])
        dk, dc = self._dtypes(layer, group)
        dev = layer.weight.device
        st = _LayerState(
            layer, group, clsK.eye(layer.in_dim, dk, dev), clsC.eye(layer.out_dim, dc, dev)
        )
        if self._alpha1(group) > 0:
            st.m_K = clsK.zeros(layer.in_dim, dk, dev)
            st.m_C = clsC.zeros(layer.out_dim, dc, dev)
        return st

    @staticmethod
    def _alpha1(group: dict) -> float:
        """The effective alpha1 (0 for kfac_like)."""
        return 0.0 if group["kfac_like"] else group["alpha1"]

    def _follow(self, st: _LayerState) -> None:
        """Move a layer's factors to its weight's device (and dtype, where not fixed)."""
        w = st.layer.weight
        seen = st.followed
        pdtype = st.group["preconditioner_dtype"]
        if (
            seen is not None
            and seen[0] == w.dtype
            and seen[1] == w.device
            and seen[2] == pdtype
            and seen[3] is st.K
            and seen[4] is st.C
        ):
            return  # called several times per step: skip the dtype/device reads
        dk, dc = self._dtypes(st.layer, st.group)
        if st.K.device != w.device or st.K.dtype != dk:
            st.K = st.K.to(dtype=dk, device=w.device)
            st.m_K = None if st.m_K is None else st.m_K.to(dtype=dk, device=w.device)
            st.gram_K = None if st.gram_K is None else gram(st.K, st.C.dim, st.group["T"])
            st.acc_K = None
        if st.C.device != w.device or st.C.dtype != dc:
            st.C = st.C.to(dtype=dc, device=w.device)
            st.m_C = None if st.m_C is None else st.m_C.to(dtype=dc, device=w.device)
            st.gram_C = None if st.gram_C is None else gram(st.C, st.K.dim, st.group["T"])
            st.acc_C = None
        st.followed = (w.dtype, w.device, pdtype, st.K, st.C)

    # ------------------------------------------------------------------ hooks
    def _sync_hooks(self) -> None:
        """Attach hooks exactly to the layers that collect statistics before the next step."""
        step = self._step
        self._capture.attach(n for n, st in self._layers.items() if step % st.group["T"] == 0)
        self._capture.clear_fired()

    def remove_hooks(self) -> None:
        """Remove all hooks from the model (the optimizer then only does first-order-like
        updates with the current factors)."""
        self._capture.detach()

    def _on_backward(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """Accumulate ``Pi(K^T a^T a K)`` and ``Pi(C^T g^T g C)`` for one backward pass."""
        if torch.is_grad_enabled():  # backward(create_graph=True): record nothing
            with torch.no_grad():
                self._statistics(name, x, grad_output)
        else:  # a plain backward already runs without grad (and the context costs ~5 us)
            self._statistics(name, x, grad_output)

    def _statistics(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """The body of :meth:`_on_backward`, run without autograd recording."""
        st = self._layers[name]
        self._follow(st)
        group, module = st.group, st.layer.module
        approx = group["kfac_approx"]
        K = st.K
        expand = approx == "expand"
        raw_K = expand and type(K) is Diagonal and K.dtype in _FULL
        if raw_K:
            sq, rows = input_square_sums(module, x, K.dtype)
            term_K, w_K = Diagonal._wrap(K.dim, sq), 1.0
        elif (
            expand
            and isinstance(module, nn.Conv2d)
            and K.dtype in _FULL
            and gram_route(K)
            and conv_row_count(module, grad_output) > K.dim
        ):
            A, rows = conv_input_gram(module, x, K.dtype)
            term_K, w_K = K.from_gram(A), 1.0
        elif K.dtype == torch.float16:  # mean of squares, accumulated in fp32
            a = input_rows(module, x, approx)
            rows = a.shape[0]
            a = (a.float() * (1.0 / math.sqrt(rows))).half()
            term_K, w_K = inner_statistic(K, a).to(dtype=torch.float32), float(rows)
        else:
            a = input_rows(module, x, approx)
            rows = a.shape[0]
            a = a if a.dtype == K.dtype else a.to(K.dtype)
            term_K, w_K = inner_statistic(K, a), 1.0
        if st.acc_K is None:
            st.acc_K = _Accumulator(raw_K)
        st.acc_K.add(term_K, w_K, rows)

        n = loss_average_count(module, grad_output, group["loss_average"])
        C = st.C
        raw_C = expand and type(C) is Diagonal and C.dtype in _FULL
        if raw_C:
            sq = grad_square_sums(module, grad_output, C.dtype)
            term_C, w_C = Diagonal._wrap(C.dim, sq), 1.0
        elif C.dtype == torch.float16:  # scaled to max |g| = 1 so nothing overflows
            g = grad_rows(module, grad_output, approx)
            g32 = g.float()
            peak = float(g32.abs().max()) if g32.numel() else 0.0
            peak = peak if math.isfinite(peak) and peak > 0 else 1.0
            g = (g32 * (1.0 / peak)).half()
            term_C, w_C = inner_statistic(C, g).to(dtype=torch.float32), peak * peak
        else:
            g = grad_rows(module, grad_output, approx)
            g = g if g.dtype == C.dtype else g.to(C.dtype)
            term_C, w_C = inner_statistic(C, g), 1.0
        if st.acc_C is None:
            st.acc_C = _Accumulator(raw_C)
        st.acc_C.add(term_C, w_C, n)

    def _drop_statistics(self) -> None:
        """Forget statistics gathered since the last step."""
        for st in self._layers.values():
            st.acc_K = st.acc_C = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop the statistics gathered with them."""
        self._drop_statistics()
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ step
    def _scales(self) -> tuple[float, float | None, bool]:
        """(divisor of the gradients, divisor of the statistics (None: each group's
        init_grad_scale), skip this step)."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:  # no GradScaler involved
            return 1.0, 1.0, False
        skip = bool(float(found_inf) > 0)
        if grad_scale is not None:
            scale = float(grad_scale)
            self._last_scale = scale
            return scale, scale, skip
        # the user called scaler.unscale_(opt): gradients are unscaled, statistics are not,
        # and the scaler hands over no scale: use each group's init_grad_scale (None here)
        if not self._warned_unscale:
            self._warned_unscale = True
            warnings.warn(
                "SINGD: scaler.unscale_(opt) ran before scaler.step(opt), so the loss scale of "
                "the statistics is unknown; they are divided by each param group's "
                "init_grad_scale. Keep it equal to the scaler's scale, e.g. `for g in "
                "opt.param_groups: g['init_grad_scale'] = scaler.get_scale()` before "
                "scaler.step(opt)",
                UserWarning,
                stacklevel=4,
            )
        return 1.0, None, skip

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Update the preconditioner (on steps ``step % T == 0``) and the parameters."""
        if closure is not None:
            raise ValueError(
                "SINGD.step does not take a closure (closure must be None): run forward and "
                "backward, then call step()"
            )
        grad_div, stat_div, skip = self._scales()
        step = self._step
        if not skip:
            self._update_preconditioners(step, stat_div)
            self._update_parameters(grad_div)
        self._drop_statistics()
        self._step = step + 1
        self._sync_hooks()

    def _lr_cov(self, group: dict, step: int) -> float:
        """beta1 for this step."""
        lr_cov = group["lr_cov"]
        return float(lr_cov(step)) if callable(lr_cov) else float(lr_cov)

    def _update_preconditioners(self, step: int, stat_div: float | None) -> None:
        """Finalise the statistics, reduce them across ranks, update K and C."""
        todo: list[tuple[_LayerState, StructuredMatrix, StructuredMatrix]] = []
        scales: list[tuple[float, float]] = []
        raw: list[tuple[bool, bool]] = []  # statistics still to be multiplied by f^2
        for name, st in self._layers.items():
            if step % st.group["T"] != 0:
                continue
            if st.acc_K is None or st.acc_C is None:
                self._check_unfired(name, st)
                continue
            self._follow(st)
            n_total = st.acc_C.count if st.group["loss_average"] is not None else 1
            H_K, s_K = st.acc_K.value_and_scale(1.0 / st.acc_K.count)
            div = st.group["init_grad_scale"] if stat_div is None else stat_div
            H_C, s_C = st.acc_C.value_and_scale(n_total / (div * div))
            if H_K.dtype != st.K.dtype or self.reduce_statistics is not None:
                H_K, s_K = _materialize(H_K, s_K, st.K.dtype), 1.0
            if H_C.dtype != st.C.dtype or self.reduce_statistics is not None:
                H_C, s_C = _materialize(H_C, s_C, st.C.dtype), 1.0
            todo.append((st, H_K, H_C))
            scales.append((s_K, s_C))
            raw.append((st.acc_K.square_sums, st.acc_C.square_sums))
        if not todo:
            return
        if self.reduce_statistics is not None:
            flat: list[Tensor] = []
            average: list[bool] = []
            for st, hk, hc in todo:
                tk, tc = hk._tensors(), hc._tensors()
                flat += [*tk, *tc]
                # H_K is a mean over rows; H_C of a sum loss (loss_average=None) is a sum
                average += [True] * len(tk) + [st.group["loss_average"] is not None] * len(tc)
            self.reduce_statistics(flat, average)
        owners = None  # work sharing (singd.distributed): each layer is updated on one rank
        if getattr(self.reduce_statistics, "share_work", False):
            owners = self.reduce_statistics.owners([(st.K, st.C) for st, _, _ in todo])
            me = self.reduce_statistics.rank()
        # layers whose K and C are both diagonal: one flat update per group and dtype
        diagonal: dict[tuple[int, torch.dtype, bool], list[int]] = {}
        for i, (st, H_K, H_C) in enumerate(todo):
            group = st.group
            alpha1 = self._alpha1(group)
            if alpha1 > 0 and st.m_K is None:
                st.m_K = type(st.K).zeros(st.K.dim, st.K.dtype, st.K.device)
                st.m_C = type(st.C).zeros(st.C.dim, st.C.dtype, st.C.device)
            if owners is not None and owners[i] != me:
                continue  # another rank updates this layer; share_factors copies it here
            if type(st.K) is Diagonal and type(st.C) is Diagonal and st.K.dtype == st.C.dtype:
                # one group and dtype: both statistics are raw square sums or neither is
                diagonal.setdefault((id(group), st.K.dtype, raw[i][0]), []).append(i)
                continue
            st.K, st.C, m_K, m_C = riemannian_step(
                st.K,
                st.C,
                diagonal_statistic(st.K, H_K.diag) if raw[i][0] else H_K,
                diagonal_statistic(st.C, H_C.diag) if raw[i][1] else H_C,
                st.m_K,
                st.m_C,
                damping=group["damping"],
                alpha1=alpha1,
                lr_cov=self._lr_cov(group, step),
                kfac_like=group["kfac_like"],
                normalize_lr_cov=group["normalize_lr_cov"],
                scale_K=scales[i][0],
                scale_C=scales[i][1],
            )
            if alpha1 > 0:
                st.m_K, st.m_C = m_K, m_C
            self._refresh_grams(st)
        for batch in diagonal.values():
            layers = [todo[i][0] for i in batch]
            group = layers[0].group
            momentum = self._alpha1(group) > 0
            squares = diagonal_steps(
                [st.K for st in layers],
                [st.C for st in layers],
                [todo[i][1] for i in batch],
                [todo[i][2] for i in batch],
                [st.m_K for st in layers] if momentum else None,
                [st.m_C for st in layers] if momentum else None,
                damping=group["damping"],
                alpha1=self._alpha1(group),
                lr_cov=self._lr_cov(group, step),
                kfac_like=group["kfac_like"],
                normalize_lr_cov=group["normalize_lr_cov"],
                scales_K=[scales[i][0] for i in batch],
                scales_C=[scales[i][1] for i in batch],
                square_sums=raw[batch[0]][0],
            )
            for j, st in enumerate(layers):  # F F^T of a diagonal factor: its squared entries
                st.gram_K = Gram("diag", squares[j])
                st.gram_C = Gram("diag", squares[len(layers) + j])
        if owners is not None:
            self.reduce_statistics.share_factors(
                [
                    [st.K, st.C, *((st.m_K, st.m_C) if self._alpha1(st.group) > 0 else ())]
                    for st, _, _ in todo
                ],
                owners,
            )
            for (st, _, _), r in zip(todo, owners):
                if r != me:
                    self._refresh_grams(st)

    @staticmethod
    def _refresh_grams(st: _LayerState) -> None:
        """Recompute the cached ``K K^T``, ``C C^T`` where worth it: with T > 1 by the cost
        rule of :func:`singd.update.gram`; with T = 1 only for block-diagonal factors (one
        batched product, then two block products per step instead of four). Layers updated
        by the batched diagonal step get their squared entries from it instead."""
        T = st.group["T"]
        if T > 1:
            st.gram_K = gram(st.K, st.C.dim, T)
            st.gram_C = gram(st.C, st.K.dim, T)
        else:
            st.gram_K = gram(st.K) if isinstance(st.K, BlockDiagonal) else None
            st.gram_C = gram(st.C) if isinstance(st.C, BlockDiagonal) else None

    def _check_unfired(self, name: str, st: _LayerState) -> None:
        """Warn once about a layer with gradients whose hooks never saw a forward pass."""
        if name in self._warned_unfired or name in self._capture.fired:
            return
        g = st.layer.weight.grad
        if g is None or not bool(g.any()):
            return
        self._warned_unfired.add(name)
        warnings.warn(
            f"SINGD: layer {name!r} has gradients but its forward hook never ran (its forward "
            "is bypassed); its K and C stay as they are",
            UserWarning,
            stacklevel=4,
        )

    def _update_parameters(self, grad_div: float) -> None:
        """Precondition the layer gradients and apply the heavy-ball update, per group."""
        by_group: dict[int, tuple[list, list]] = {id(g): ([], []) for g in self.param_groups}
        # layers with diagonal F F^T caches on both sides: (params, grads, lefts, rights)
        diagonal: dict[int, tuple[list, list, list, list]] = {}
        for st in self._layers.values():
            layer = st.layer
            if layer.weight.grad is None:
                continue
            self._follow(st)
            gK, gC = st.gram_K, st.gram_C
            if (
                gK is not None
                and gC is not None
                and gK.kind == gC.kind == "diag"
                and all(
                    p.grad is not None and p.grad.dtype == gK.value.dtype == gC.value.dtype
                    for p in layer.params()
                )
            ):
                lefts, rights = layer.diagonal_scales(gC.value, gK.value)
                batch = diagonal.setdefault(id(st.group), ([], [], [], []))
                batch[0].extend(layer.params())
                batch[1].extend(p.grad for p in layer.params())
                batch[2].extend(lefts)
                batch[3].extend(rights)
                continue
            G = layer.grad_matrix()
            if grad_div != 1.0:
                G.div_(grad_div)
            D = precondition(G, st.K, st.C, gK, gC)
            params, dirs = by_group[id(st.group)]
            params.extend(layer.params())
            dirs.extend(layer.split(D))
        for key, (params, grads, lefts, rights) in diagonal.items():
            D = precondition_diagonal(grads, lefts, rights)
            if grad_div != 1.0:
                torch._foreach_div_(D, grad_div)
            by_group[key][0].extend(params)
            by_group[key][1].extend(D)
        for group in self.param_groups:
            params, dirs = by_group[id(group)]
            layer_ids = {id(p) for p in params}
            for p in group["params"]:
                if p.grad is None or id(p) in layer_ids:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(
                        "SINGD does not support sparse gradients (Embedding(sparse=True))"
                    )
                if grad_div != 1.0:
                    d = p.grad / grad_div
                elif group["weight_decay"] != 0.0:
                    d = p.grad.clone()
                else:
                    d = p.grad
                params.append(p)
                dirs.append(d)
            if not params:
                continue
            heavy_ball_step_(
                self.state,
                params,
                dirs,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
            )

    # ------------------------------------------------------------------ views
    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far (skipped GradScaler steps included)."""
        return self._step

    def preconditioner_factors(self) -> dict[str, LayerFactors]:
        """Layer name -> its factors ``K``, ``C`` (role ``"root"``) and ``m_K``, ``m_C``
        (role ``"momentum"``, only when alpha1 > 0). The matrices are the optimizer's own:
        read them, never mutate them (``FactorView.dense()`` gives a copy)."""
        out: dict[str, LayerFactors] = {}
        for name, st in self._layers.items():
            sk, sc = st.group["structures"]
            factors = {
                "K": FactorView(st.K, "root", sk),
                "C": FactorView(st.C, "root", sc),
            }
            if st.m_K is not None and self._alpha1(st.group) > 0:
                factors["m_K"] = FactorView(st.m_K, "momentum", sk)
                factors["m_C"] = FactorView(st.m_C, "momentum", sc)
            out[name] = LayerFactors(name, st.layer.kind, factors)
        return out

    def state_bytes(self) -> dict[str, dict[str, int]]:
        """Optimizer-state bytes: layer (or ``"fallback"``) -> component (``K``, ``C``,
        ``m_K``, ``m_C``, ``momentum``) -> bytes. K and C include their cached Gram matrices
        (kept when T > 1)."""

        def nbytes(S: StructuredMatrix | None) -> int:
            if S is None:
                return 0
            return sum(t.numel() * t.element_size() for t in S._tensors())

        def buf_bytes(params: Iterable[Tensor]) -> int:
            total = 0
            for p in params:
                buf = self.state[p].get("momentum_buffer") if p in self.state else None
                if buf is not None:
                    total += buf.numel() * buf.element_size()
            return total

        out: dict[str, dict[str, int]] = {}
        for name, st in self._layers.items():
            entry = {
                "K": nbytes(st.K) + (st.gram_K.nbytes() if st.gram_K else 0),
                "C": nbytes(st.C) + (st.gram_C.nbytes() if st.gram_C else 0),
            }
            if st.m_K is not None:
                entry["m_K"], entry["m_C"] = nbytes(st.m_K), nbytes(st.m_C)
            entry["momentum"] = buf_bytes(st.layer.params())
            out[name] = entry
        if self._fallback:
            out["fallback"] = {"momentum": buf_bytes(self._fallback.values())}
        return out

    def fallback_parameters(self) -> dict[str, nn.Parameter]:
        """Qualified name -> parameter trained by the first-order fallback."""
        return dict(self._fallback)

    def statistics_pending(self) -> bool:
        """Whether statistics buffers exist (True only between backward and step/zero_grad)."""
        return any(st.acc_K is not None or st.acc_C is not None for st in self._layers.values())

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loads with ``torch.load(weights_only=True)``);
        a callable ``lr_cov`` is stored as a marker and kept from the loading optimizer."""
        sd = super().state_dict()
        groups = []
        for g in sd["param_groups"]:
            g = dict(g)
            if callable(g["lr_cov"]):
                g["lr_cov"] = _CALLABLE
            g["structures"] = list(g["structures"])
            g["preconditioner_dtype"] = [
                None if d is None else str(d).removeprefix("torch.")
                for d in g["preconditioner_dtype"]
            ]
            groups.append(g)
        sd["param_groups"] = groups
        layers = {}
        for name, st in self._layers.items():
            entry = {
                "structures": [st.K.name, st.C.name],
                "dims": [st.K.dim, st.C.dim],
                "K": dict(st.K.to_dict()),
                "C": dict(st.C.to_dict()),
            }
            if st.m_K is not None:
                entry["m_K"], entry["m_C"] = dict(st.m_K.to_dict()), dict(st.m_C.to_dict())
            layers[name] = entry
        sd["singd"] = {"step": self._step, "last_scale": self._last_scale, "layers": layers}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (layer names and structures must match)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("singd", None)
        if extra is None:
            raise ValueError("state_dict lacks the 'singd' entry: not saved by SINGD.state_dict()")
        saved_layers = extra["layers"]
        if set(saved_layers) != set(self._layers):
            raise ValueError(
                f"state_dict layers {sorted(saved_layers)} do not match this optimizer's "
                f"layers {sorted(self._layers)}"
            )
        current = [dict(g) for g in self.param_groups]
        restored: dict[str, dict[str, StructuredMatrix | None]] = {}
        for name, entry in saved_layers.items():
            st = self._layers[name]
            dk, dc = entry["dims"]
            dev = st.layer.weight.device
            mats = {}
            for key, sname, dim in (("K", 0, dk), ("C", 1, dc), ("m_K", 0, dk), ("m_C", 1, dc)):
                if key in entry:
                    cls = structure(entry["structures"][sname])
                    tensors = {k: v.to(device=dev).clone() for k, v in entry[key].items()}
                    mats[key] = cls.from_dict(dim, tensors)
                else:
                    mats[key] = None
            restored[name] = mats
        super().load_state_dict(state_dict)
        for g, old in zip(self.param_groups, current):
            if g["lr_cov"] == _CALLABLE:
                g["lr_cov"] = old["lr_cov"]
            g["structures"] = tuple(g["structures"])
            g["preconditioner_dtype"] = tuple(
                resolve_dtype(d, "preconditioner_dtype") for d in g["preconditioner_dtype"]
            )
        # layer states point at the (new) group dicts
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for name, st in self._layers.items():
            st.group = group_of[id(st.layer.weight)]
            mats = restored[name]
            st.K, st.C, st.m_K, st.m_C = mats["K"], mats["C"], mats["m_K"], mats["m_C"]
            self._refresh_grams(st)
            st.acc_K = st.acc_C = None
        self._step = int(extra["step"])
        self._last_scale = extra["last_scale"]
        self._sync_hooks()
