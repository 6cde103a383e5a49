"""SINGD: structured inverse-free natural gradient descent (Lin et al., ICML 2024).

A thin subclass of :class:`singd.base.KroneckerOptimizer` (hooks, fallback, GradScaler,
configs) over :mod:`singd.statistics` (H_K and H_C from the captured rows) and
:mod:`singd.update` (the math). See docs/architecture.md, 'singd: the optimizer', and the
class docstring.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from singd.base import (
    FIRST_ORDER_DEFAULTS,
    AmpScales,
    FirstOrderBatch,
    FirstOrderConfig,
    KroneckerOptimizer,
    adam_update_directions,
    check_bool,
    check_choice,
    check_int,
    check_number,
    is_number,
)
from singd.capture import KFAC_APPROXIMATIONS, LAYER_KINDS, LOSS_AVERAGES, Layer
from singd.distributed import default_reducer
from singd.dtypes import FLOAT_DTYPES, resolve_dtype
from singd.statistics import Accumulator, Statistics, accumulate, finalize, grad_term, input_term
from singd.structures import FORMS, BlockDiagonal, Diagonal, StructuredMatrix, structure
from singd.update import (
    Gram,
    diagonal_statistic,
    diagonal_steps,
    grafted_heavy_ball_,
    gram,
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
    **FIRST_ORDER_DEFAULTS,
    "grafting": None,
    "guard": 0.5,
    "warmup_steps": None,
    "warmup_lr_cov": 0.1,
}
#: Valid values of ``grafting``.
GRAFTINGS: tuple[str | None, ...] = (None, "adam")
#: The reference package's hyper-parameters (the rest are this package's additions).
_OWN = tuple(k for k in DEFAULTS if k not in FIRST_ORDER_DEFAULTS)

_CALLABLE = "<callable: not saved>"


def _check_pair(key: str, value: object, what: str) -> None:
    """Raise a ValueError naming ``key`` unless ``value`` is a tuple or list of length 2."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{key} must be a pair ({what}), got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{key} must have length 2 ({what}), got length {len(value)}: {value!r}")


def validate_hyperparameters(h: dict[str, Any]) -> dict[str, Any]:
    """Check SINGD hyper-parameters; return a copy with ``structures`` and
    ``preconditioner_dtype`` normalised to tuples. Raises ValueError naming the argument
    and its valid values."""
    h = dict(h)
    check_number("lr", h["lr"])
    check_number("weight_decay", h["weight_decay"])
    lr_cov = h["lr_cov"]
    if not callable(lr_cov) and (not is_number(lr_cov) or not lr_cov >= 0):
        raise ValueError(
            f"lr_cov must be a number >= 0 or a callable step -> float, got {lr_cov!r}"
        )
    check_number("damping", h["damping"], low_open=True)
    check_number("momentum", h["momentum"], high=1.0)
    check_number("alpha1", h["alpha1"], high=1.0)
    check_int("T", h["T"], low=1, what=" (update the preconditioner every T steps)")
    check_number("init_grad_scale", h["init_grad_scale"], low_open=True)
    _check_pair("structures", h["structures"], "structure of K, structure of C")
    for s in h["structures"]:
        try:
            structure(s)
        except (ValueError, TypeError) as err:
            raise ValueError(f"structures: {err} (valid forms: {', '.join(FORMS)})") from None
    h["structures"] = tuple(h["structures"])
    check_choice("kfac_approx", h["kfac_approx"], KFAC_APPROXIMATIONS)
    check_choice("loss_average", h["loss_average"], LOSS_AVERAGES)
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
        check_bool(key, h[key])
    check_choice("grafting", h["grafting"], GRAFTINGS)
    if h["warmup_steps"] is not None:
        check_int("warmup_steps", h["warmup_steps"], low=0, what=" (or None: 20 with grafting)")
    check_number("warmup_lr_cov", h["warmup_lr_cov"])
    if h["guard"] is not None:
        check_number("guard", h["guard"], low_open=True)
    return h


@dataclass(frozen=True)
class SINGDConfig:
    """One param group's SINGD hyper-parameters, checked and normalised."""

    lr: float
    momentum: float
    damping: float
    alpha1: float
    weight_decay: float
    T: int
    lr_cov: float | Callable[[int], float]
    structures: tuple[str, str]
    kfac_approx: str
    warn_unsupported: bool
    kfac_like: bool
    preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None]
    init_grad_scale: float
    normalize_lr_cov: bool
    loss_average: str | None
    grafting: str | None
    guard: float | None
    warmup_steps: int | None
    warmup_lr_cov: float
    first_order: FirstOrderConfig

    @classmethod
    def parse(cls, group: dict[str, Any]) -> SINGDConfig:
        """The config of a group (ValueError naming a bad hyper-parameter)."""
        h = validate_hyperparameters({k: group.get(k, DEFAULTS[k]) for k in _OWN})
        return cls(**h, first_order=FirstOrderConfig.parse(group))

    @property
    def alpha1_effective(self) -> float:
        """The effective alpha1 (0 for kfac_like): the Riemannian momentum's weight."""
        return 0.0 if self.kfac_like else self.alpha1

    @property
    def warmup(self) -> int:
        """Steps of the preconditioner warm-up (``warmup_steps``; None: 20 with grafting,
        else 0)."""
        if self.warmup_steps is None:
            return 20 if self.grafting is not None else 0
        return self.warmup_steps

    def beta1(self, step: int) -> float:
        """lr_cov (beta1) at ``step``: at least ``warmup_lr_cov`` during the warm-up."""
        beta = float(self.lr_cov(step)) if callable(self.lr_cov) else float(self.lr_cov)
        return max(beta, self.warmup_lr_cov) if step < self.warmup else beta

    def due(self, step: int) -> bool:
        """Whether the preconditioner updates at ``step``: every step during the warm-up,
        then every ``T`` steps."""
        return step < self.warmup or step % self.T == 0


class GuardActivation(NamedTuple):
    """One activation of the factor-update guard: at ``step`` the update of ``factor``
    ("K" or "C") of ``layer`` would have moved it by ``reach = beta1 ||m||_F`` (more than
    the group's ``guard``), and beta1 was shrunk to meet the guard."""

    step: int
    layer: str
    factor: str
    reach: float


class _Followed(NamedTuple):
    """What :meth:`SINGD._follow` last checked; while it is unchanged nothing moves."""

    weight_dtype: torch.dtype
    device: torch.device
    preconditioner_dtype: tuple
    K: StructuredMatrix
    C: StructuredMatrix


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
    acc_K: Accumulator | None = None
    acc_C: Accumulator | None = None
    followed: _Followed | None = None


@dataclass
class _Due:
    """A layer whose preconditioner is updated this step, with its finished statistics."""

    state: _LayerState
    cfg: SINGDConfig
    stats: Statistics


class _Ownership(NamedTuple):
    """Work sharing across ranks: the rank that updates each due layer, and this rank."""

    ranks: list[int]
    me: int


@dataclass
class _DiagonalGrads:
    """Parameters of one group whose layers have diagonal ``F F^T`` caches on both sides,
    their gradients and the broadcastable squared C (``lefts``) and K (``rights``) entries."""

    params: list[Tensor]
    grads: list[Tensor]
    lefts: list[Tensor]
    rights: list[Tensor]
    sizes: list[int]  # parameters per layer, in order


class SINGD(KroneckerOptimizer):
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
    * **First-order fallback** (``fallback``): every other trainable parameter (LayerNorm,
      BatchNorm, free ``nn.Parameter``s, tied weights, layers with a frozen weight or bias)
      is trained by ``"adamw"`` (default: ``torch.optim.AdamW``'s rule with ``fallback_lr``
      (None: ``lr``), ``betas``, ``eps`` and ``fallback_weight_decay``), ``"heavy_ball"``
      (the layers' rule on the raw gradient: ``s = grad + weight_decay * p``,
      ``buf = momentum * buf + s``, ``p -= lr * buf``) or ``"none"`` (left untrained, as the
      reference package does). One warning lists them (``warn_unsupported=False`` silences it).
    * ``grafting="adam"``: each layer's step (after momentum) is rescaled to the norm of the
      Adam update of that layer (Adam's moments are kept per parameter, ``betas``/``eps``),
      and ``weight_decay`` is decoupled as in AdamW, so ``lr`` means AdamW's lr:
      ``SINGD(model, lr=<your AdamW lr>, grafting="adam")`` replaces AdamW. None (default)
      keeps the reference update.
    * ``guard`` (default 0.5): a trust region on the factor update ``K <- K (I - beta1 m_K)``:
      where ``beta1`` times a bound on ``||m_K||_2`` exceeds it, beta1 shrinks to meet it, so
      one update scales K by at most ``1 + guard``; inactive (bit for bit the reference
      update) on small steps. ``guard_activations()`` lists every activation. None: off.
    * Preconditioner warm-up (``warmup_steps``, ``warmup_lr_cov``): for the first
      ``warmup_steps`` steps the factors update every step with ``lr_cov`` at least
      ``warmup_lr_cov`` (0.1), so K and C leave the identity early; None (default) means 20
      steps with grafting and none without (the reference update).
    * ``compensated=True``: 16-bit parameters are updated with Kahan compensation (a buffer
      of the parameter's dtype), so updates below half an ulp accumulate instead of being
      rounded away (SINGD's update and the fallback's).
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

    DEFAULTS = DEFAULTS
    LAYER_KINDS = LAYER_KINDS

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
        fallback: str = DEFAULTS["fallback"],
        fallback_lr: float | None = DEFAULTS["fallback_lr"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        eps: float = DEFAULTS["eps"],
        fallback_weight_decay: float = DEFAULTS["fallback_weight_decay"],
        compensated: bool = DEFAULTS["compensated"],
        grafting: str | None = DEFAULTS["grafting"],
        guard: float | None = DEFAULTS["guard"],
        warmup_steps: int | None = DEFAULTS["warmup_steps"],
        warmup_lr_cov: float = DEFAULTS["warmup_lr_cov"],
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        arguments = dict(locals())
        defaults = validate_hyperparameters({k: arguments[k] for k in _OWN})
        first = FirstOrderConfig.parse(arguments)
        defaults.update({k: getattr(first, k) for k in FIRST_ORDER_DEFAULTS})
        self._warned_unscale = False
        #: every activation of the factor-update guard, in order (see :meth:`guard_activations`)
        self._guard_log: list[GuardActivation] = []
        self._grad_div = 1.0  # this step's gradient unscaling, for grafting's raw gradients
        #: ``reduce(tensors, average)``: in place across ranks, the mean where ``average[i]``,
        #: else the sum (see :mod:`singd.distributed`); None: statistics stay rank-local.
        self.reduce_statistics: Callable[[list[Tensor], list[bool]], None] | None
        self.reduce_statistics = default_reducer(model)
        super().__init__(model, params, defaults)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _due(cfg: SINGDConfig, step: int) -> bool:
        """Whether the group updates its preconditioner at ``step`` (warm-up included)."""
        return cfg.due(step)

    def _parse(self, group: dict[str, Any]) -> SINGDConfig:
        """The group's :class:`SINGDConfig`."""
        return SINGDConfig.parse(group)

    def _normalize_group(self, param_group: dict[str, Any], cfg: SINGDConfig) -> dict[str, Any]:
        """The group with normalised ``structures``/``preconditioner_dtype``; warns when
        kfac_like ignores alpha1."""
        if cfg.kfac_like and cfg.alpha1 > 0:
            warnings.warn(
                f"kfac_like=True (IKFAC) uses no Riemannian momentum: alpha1={cfg.alpha1} "
                "is ignored (pass alpha1=0 to silence this warning)",
                UserWarning,
                stacklevel=4,
            )
        group = dict(param_group)
        for key in ("structures", "preconditioner_dtype"):
            if key in group:
                group[key] = getattr(cfg, key)
        return group

    @staticmethod
    def _dtypes(layer: Layer, cfg: SINGDConfig) -> tuple[torch.dtype, torch.dtype]:
        """The K and C dtypes of a layer in a group."""
        w = layer.weight
        dk, dc = cfg.preconditioner_dtype
        return (dk or w.dtype, dc or w.dtype)

    @staticmethod
    def _structures(layer: Layer, cfg: SINGDConfig) -> tuple[str, str]:
        """The K and C structures of a layer: the group's, except where the layer fixes K
        (an embedding's one-hot input makes K diagonal)."""
        sk, sc = cfg.structures
        return (layer.k_structure or sk, sc)

    def _new_layer(self, layer: Layer, group: dict) -> _LayerState:
        """Identity factors (zero momenta when alpha1 > 0) for a layer."""
        cfg = self._config(group)
        clsK, clsC = (structure(s) for s in self._structures(layer, cfg))
        dk, dc = self._dtypes(layer, cfg)
        dev = layer.weight.device
        st = _LayerState(
            layer, group, clsK.eye(layer.in_dim, dk, dev), clsC.eye(layer.out_dim, dc, dev)
        )
        if cfg.alpha1_effective > 0:
            st.m_K = clsK.zeros(layer.in_dim, dk, dev)
            st.m_C = clsC.zeros(layer.out_dim, dc, dev)
        return st

    def _follow(self, st: _LayerState, cfg: SINGDConfig) -> None:
        """Move a layer's factors to its weight's device (and dtype, where not fixed)."""
        w = st.layer.weight
        seen = st.followed
        pdtype = cfg.preconditioner_dtype
        if (
            seen is not None
            and seen.weight_dtype == w.dtype
            and seen.device == w.device
            and seen.preconditioner_dtype == pdtype
            and seen.K is st.K
            and seen.C is st.C
        ):
            return  # called several times per step: skip the dtype/device reads
        dk, dc = self._dtypes(st.layer, cfg)
        if st.K.device != w.device or st.K.dtype != dk:
            st.K = st.K.to(dtype=dk, device=w.device)
            st.m_K = None if st.m_K is None else st.m_K.to(dtype=dk, device=w.device)
            st.gram_K = None if st.gram_K is None else gram(st.K, st.C.dim, cfg.T)
            st.acc_K = None
        if st.C.device != w.device or st.C.dtype != dc:
            st.C = st.C.to(dtype=dc, device=w.device)
            st.m_C = None if st.m_C is None else st.m_C.to(dtype=dc, device=w.device)
            st.gram_C = None if st.gram_C is None else gram(st.C, st.K.dim, cfg.T)
            st.acc_C = None
        st.followed = _Followed(w.dtype, w.device, pdtype, st.K, st.C)

    # ------------------------------------------------------------------ statistics
    def _accumulate(self, name: str, x: Tensor, grad_output: Tensor) -> None:
        """Add ``Pi(K^T a^T a K)`` and ``Pi(C^T g^T g C)`` of one backward pass."""
        st = self._layers[name]
        cfg = self._config(st.group)
        self._follow(st, cfg)
        module = st.layer.module
        st.acc_K = accumulate(st.acc_K, input_term(module, x, grad_output, st.K, cfg.kfac_approx))
        term_C = grad_term(module, grad_output, st.C, cfg.kfac_approx, cfg.loss_average)
        st.acc_C = accumulate(st.acc_C, term_C)

    def _drop_statistics(self) -> None:
        """Forget statistics gathered since the last step."""
        for st in self._layers.values():
            st.acc_K = st.acc_C = None

    # ------------------------------------------------------------------ step
    def _step_once(self, step: int, scales: AmpScales, configs: dict[int, SINGDConfig]) -> None:
        """Update K and C (on layers due at ``step``), then the parameters."""
        if scales.stat_div is None:
            self._warn_unknown_scale()
        if not scales.skip:
            self._update_preconditioners(step, scales.stat_div, configs)
            self._update_parameters(scales.grad_div, configs)

    def _warn_unknown_scale(self) -> None:
        """Warn once that the statistics' loss scale is each group's init_grad_scale."""
        if self._warned_unscale:
            return
        self._warned_unscale = True
        warnings.warn(
            "SINGD: scaler.unscale_(opt) ran before scaler.step(opt), so the loss scale of "
            "the statistics is unknown; they are divided by each param group's "
            "init_grad_scale. Keep it equal to the scaler's scale, e.g. `for g in "
            "opt.param_groups: g['init_grad_scale'] = scaler.get_scale()` before "
            "scaler.step(opt)",
            UserWarning,
            stacklevel=5,
        )

    def _due_statistics(
        self, step: int, stat_div: float | None, configs: dict[int, SINGDConfig]
    ) -> list[_Due]:
        """The layers due at ``step`` that gathered statistics, with their statistics
        finished (``stat_div`` None: each group's init_grad_scale)."""
        due = []
        for name, st in self._layers.items():
            cfg = configs[id(st.group)]
            if not cfg.due(step):
                continue
            if st.acc_K is None or st.acc_C is None:
                self._check_unfired(name, st)
                continue
            self._follow(st, cfg)
            stats = finalize(
                st.acc_K,
                st.acc_C,
                st.K,
                st.C,
                loss_average=cfg.loss_average,
                stat_div=cfg.init_grad_scale if stat_div is None else stat_div,
                materialized=self.reduce_statistics is not None,
            )
            due.append(_Due(st, cfg, stats))
        return due

    def _reduce(self, due: list[_Due]) -> None:
        """All statistics of this step across ranks in one call of ``reduce_statistics``."""
        flat: list[Tensor] = []
        average: list[bool] = []
        for d in due:
            tk, tc = d.stats.H_K._tensors(), d.stats.H_C._tensors()
            flat += [*tk, *tc]
            # H_K is a mean over rows; H_C of a sum loss (loss_average=None) is a sum
            average += [True] * len(tk) + [d.cfg.loss_average is not None] * len(tc)
        self.reduce_statistics(flat, average)

    def _ownership(self, due: list[_Due]) -> _Ownership | None:
        """Which rank updates which layer when ``reduce_statistics`` shares the work."""
        if not getattr(self.reduce_statistics, "share_work", False):
            return None
        ranks = self.reduce_statistics.owners([(d.state.K, d.state.C) for d in due])
        return _Ownership(ranks, self.reduce_statistics.rank())

    def _update_preconditioners(
        self, step: int, stat_div: float | None, configs: dict[int, SINGDConfig]
    ) -> None:
        """Finalise the statistics, reduce them across ranks, update K and C."""
        due = self._due_statistics(step, stat_div, configs)
        if not due:
            return
        if self.reduce_statistics is not None:
            self._reduce(due)
        owners = self._ownership(due)
        # layers whose K and C are both diagonal: one flat update per group and dtype
        diagonal: dict[tuple[int, torch.dtype, bool], list[_Due]] = {}
        for i, d in enumerate(due):
            st = d.state
            if d.cfg.alpha1_effective > 0 and st.m_K is None:
                st.m_K = type(st.K).zeros(st.K.dim, st.K.dtype, st.K.device)
                st.m_C = type(st.C).zeros(st.C.dim, st.C.dtype, st.C.device)
            if owners is not None and owners.ranks[i] != owners.me:
                continue  # another rank updates this layer; share_factors copies it here
            if type(st.K) is Diagonal and type(st.C) is Diagonal and st.K.dtype == st.C.dtype:
                # one group and dtype: both statistics are raw square sums or neither is
                key = (id(st.group), st.K.dtype, d.stats.square_sums_K)
                diagonal.setdefault(key, []).append(d)
                continue
            self._riemannian_update(d, step)
        for batch in diagonal.values():
            self._diagonal_update(batch, step)
        if owners is not None:
            self._share_factors(due, owners)

    def _guard_observer(self, step: int, layer: str, guard: float | None) -> Callable | None:
        """The ``observe`` callback that logs the guard's activations for ``layer``."""
        if guard is None:
            return None

        def observe(factor: str, reach: float) -> None:
            if reach > guard:
                self._guard_log.append(GuardActivation(step, layer, factor, reach))

        return observe

    def _riemannian_update(self, d: _Due, step: int) -> None:
        """:func:`singd.update.riemannian_step` of one layer."""
        st, cfg, s = d.state, d.cfg, d.stats
        alpha1 = cfg.alpha1_effective
        st.K, st.C, m_K, m_C = riemannian_step(
            st.K,
            st.C,
            diagonal_statistic(st.K, s.H_K.diag) if s.square_sums_K else s.H_K,
            diagonal_statistic(st.C, s.H_C.diag) if s.square_sums_C else s.H_C,
            st.m_K,
            st.m_C,
            damping=cfg.damping,
            alpha1=alpha1,
            lr_cov=cfg.beta1(step),
            kfac_like=cfg.kfac_like,
            normalize_lr_cov=cfg.normalize_lr_cov,
            scale_K=s.scale_K,
            scale_C=s.scale_C,
            guard=cfg.guard,
            observe=self._guard_observer(step, st.layer.name, cfg.guard),
        )
        if alpha1 > 0:
            st.m_K, st.m_C = m_K, m_C
        self._refresh_grams(st, cfg.T)

    def _diagonal_update(self, batch: list[_Due], step: int) -> None:
        """:func:`singd.update.diagonal_steps` of layers with diagonal K and C that share a
        group and dtype."""
        layers = [d.state for d in batch]
        cfg = batch[0].cfg
        momentum = cfg.alpha1_effective > 0

        def observe(index: int, factor: str, reach: float) -> None:
            name = layers[index].layer.name
            self._guard_log.append(GuardActivation(step, name, factor, reach))

        squares = diagonal_steps(
            [st.K for st in layers],
            [st.C for st in layers],
            [d.stats.H_K for d in batch],
            [d.stats.H_C for d in batch],
            [st.m_K for st in layers] if momentum else None,
            [st.m_C for st in layers] if momentum else None,
            damping=cfg.damping,
            alpha1=cfg.alpha1_effective,
            lr_cov=cfg.beta1(step),
            kfac_like=cfg.kfac_like,
            normalize_lr_cov=cfg.normalize_lr_cov,
            scales_K=[d.stats.scale_K for d in batch],
            scales_C=[d.stats.scale_C for d in batch],
            square_sums=batch[0].stats.square_sums_K,
            guard=cfg.guard,
            observe=observe,
        )
        for j, st in enumerate(layers):  # F F^T of a diagonal factor: its squared entries
            st.gram_K = Gram("diag", squares[j])
            st.gram_C = Gram("diag", squares[len(layers) + j])

    def _share_factors(self, due: list[_Due], owners: _Ownership) -> None:
        """Copy each layer's new factors from the rank that updated it."""
        self.reduce_statistics.share_factors(
            [
                [
                    d.state.K,
                    d.state.C,
                    *((d.state.m_K, d.state.m_C) if d.cfg.alpha1_effective > 0 else ()),
                ]
                for d in due
            ],
            owners.ranks,
        )
        for d, r in zip(due, owners.ranks):
            if r != owners.me:
                self._refresh_grams(d.state, d.cfg.T)

    @staticmethod
    def _refresh_grams(st: _LayerState, T: int) -> None:
        """Recompute the cached ``K K^T``, ``C C^T`` where worth it: with T > 1 by the cost
        rule of :func:`singd.update.gram`; with T = 1 only for block-diagonal factors (one
        batched product, then two block products per step instead of four). Layers updated
        by the batched diagonal step get their squared entries from it instead."""
        if T > 1:
            st.gram_K = gram(st.K, st.C.dim, T)
            st.gram_C = gram(st.C, st.K.dim, T)
        else:
            st.gram_K = gram(st.K) if isinstance(st.K, BlockDiagonal) else None
            st.gram_C = gram(st.C) if isinstance(st.C, BlockDiagonal) else None

    def _update_parameters(self, grad_div: float, configs: dict[int, SINGDConfig]) -> None:
        """Precondition the layer gradients and apply the heavy-ball update, per group."""
        batches = {key: FirstOrderBatch([], [], []) for key in configs}
        diagonal: dict[int, _DiagonalGrads] = {}
        assembled: dict[int, dict[Tensor, Tensor]] = {}
        for st in self._layers.values():
            layer = st.layer
            if layer.weight.grad is None:
                continue
            self._follow(st, configs[id(st.group)])
            gK, gC = st.gram_K, st.gram_C
            if (
                gK is not None
                and gC is not None
                and gK.kind == gC.kind == "diag"
                and not layer.sliced
                and all(
                    p.grad is not None and p.grad.dtype == gK.value.dtype == gC.value.dtype
                    for p in layer.params()
                )
            ):
                lefts, rights = layer.diagonal_scales(gC.value, gK.value)
                grads = diagonal.setdefault(id(st.group), _DiagonalGrads([], [], [], [], []))
                grads.sizes.append(len(layer.params()))
                grads.params.extend(layer.params())
                grads.grads.extend(p.grad for p in layer.params())
                grads.lefts.extend(lefts)
                grads.rights.extend(rights)
                continue
            G = layer.grad_matrix()
            if grad_div != 1.0:
                G.div_(grad_div)
            D = precondition(G, st.K, st.C, gK, gC)
            if layer.sliced:  # a block of a parameter: written into its whole direction
                whole = assembled.setdefault(id(st.group), {})
                for p in layer.params():
                    if p not in whole:  # rows no layer covers keep the raw gradient
                        whole[p] = p.grad / grad_div if grad_div != 1.0 else p.grad.clone()
                targets = layer.parts([whole[p] for p in layer.params()])
                for part, d in zip(targets, layer.split(D)):
                    part.copy_(d)
                continue
            batches[id(st.group)].add(layer.params(), layer.split(D))
        for key, whole in assembled.items():
            for p, d in whole.items():
                batches[key].add([p], [d])
        for key, grads in diagonal.items():
            D = precondition_diagonal(grads.grads, grads.lefts, grads.rights)
            if grad_div != 1.0:
                torch._foreach_div_(D, grad_div)
            start = 0
            for size in grads.sizes:
                end = start + size
                batches[key].add(grads.params[start:end], D[start:end])
                start = end
        self._grad_div = grad_div
        for group in self.param_groups:
            cfg, batch = configs[id(group)], batches[id(group)]
            done = {id(p) for p in batch.params}
            rest = [p for p in group["params"] if id(p) not in done]
            self._fallback_update(cfg, rest, grad_div, batch)
            self._heavy_ball(cfg, batch)

    def _heavy_ball(self, cfg: SINGDConfig, batch: FirstOrderBatch) -> None:
        """The group's heavy-ball update, grafted onto Adam's per-layer norms with
        ``grafting="adam"`` (:func:`singd.update.grafted_heavy_ball_`)."""
        if cfg.grafting is None or not batch.params:
            super()._heavy_ball(cfg, batch)
            return
        raw = [p.grad if self._grad_div == 1.0 else p.grad / self._grad_div for p in batch.params]
        adam = adam_update_directions(self.state, batch.params, raw, cfg.first_order)
        buffers = [self.state[p].get("momentum_buffer") for p in batch.params]
        directions = [
            d if d.dtype == p.dtype else d.to(p.dtype)
            for d, p in zip(batch.directions, batch.params)
        ]
        new = grafted_heavy_ball_(
            batch.params,
            [d.clone() if d is p.grad else d for d, p in zip(directions, batch.params)],
            buffers,
            adam,
            batch.units,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            compensations=self._compensations(cfg, batch.params),
        )
        if cfg.momentum > 0:
            for p, buf in zip(batch.params, new):
                self.state[p]["momentum_buffer"] = buf

    # ------------------------------------------------------------------ views
    def preconditioner_factors(self) -> dict[str, LayerFactors]:
        """Layer name -> its factors ``K``, ``C`` (role ``"root"``) and ``m_K``, ``m_C``
        (role ``"momentum"``, only when alpha1 > 0). The matrices are the optimizer's own:
        read them, never mutate them (``FactorView.dense()`` gives a copy)."""
        out: dict[str, LayerFactors] = {}
        for name, st in self._layers.items():
            cfg = self._config(st.group)
            sk, sc = self._structures(st.layer, cfg)
            factors = {
                "K": FactorView(st.K, "root", sk),
                "C": FactorView(st.C, "root", sc),
            }
            if st.m_K is not None and cfg.alpha1_effective > 0:
                factors["m_K"] = FactorView(st.m_K, "momentum", sk)
                factors["m_C"] = FactorView(st.m_C, "momentum", sc)
            out[name] = LayerFactors(name, st.layer.kind, factors)
        return out

    def guard_activations(self) -> list[GuardActivation]:
        """Every activation of the factor-update guard so far, in order (a copy)."""
        return list(self._guard_log)

    def _factor_bytes(self, name: str, st: _LayerState) -> dict[str, int]:
        """``K``, ``C`` (with their cached Gram matrices, kept when T > 1), ``m_K``, ``m_C``."""

        def nbytes(S: StructuredMatrix | None) -> int:
            if S is None:
                return 0
            return sum(t.numel() * t.element_size() for t in S._tensors())

        entry = {
            "K": nbytes(st.K) + (st.gram_K.nbytes() if st.gram_K else 0),
            "C": nbytes(st.C) + (st.gram_C.nbytes() if st.gram_C else 0),
        }
        if st.m_K is not None:
            entry["m_K"], entry["m_C"] = nbytes(st.m_K), nbytes(st.m_C)
        return entry

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
        sd["singd"] = {"step": self._step, "layers": layers}
        return sd

    def _restore_factors(
        self, saved_layers: dict[str, Any]
    ) -> dict[str, dict[str, StructuredMatrix | None]]:
        """The saved factors and momenta of every layer, on its weight's device."""
        if set(saved_layers) != set(self._layers):
            raise ValueError(
                f"state_dict layers {sorted(saved_layers)} do not match this optimizer's "
                f"layers {sorted(self._layers)}"
            )
        restored: dict[str, dict[str, StructuredMatrix | None]] = {}
        for name, entry in saved_layers.items():
            dk, dc = entry["dims"]
            dev = self._layers[name].layer.weight.device
            mats = {}
            for key, side, dim in (("K", 0, dk), ("C", 1, dc), ("m_K", 0, dk), ("m_C", 1, dc)):
                if key in entry:
                    cls = structure(entry["structures"][side])
                    tensors = {k: v.to(device=dev).clone() for k, v in entry[key].items()}
                    mats[key] = cls.from_dict(dim, tensors)
                else:
                    mats[key] = None
            restored[name] = mats
        return restored

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (layer names and structures must match; the param
        groups' hyper-parameters are validated before anything changes)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("singd", None)
        if extra is None:
            raise ValueError("state_dict lacks the 'singd' entry: not saved by SINGD.state_dict()")

        def keep_callable(saved: dict, current: dict) -> dict:
            if saved["lr_cov"] == _CALLABLE:
                return {**saved, "lr_cov": current["lr_cov"]}
            return saved

        self._check_loaded_groups(state_dict["param_groups"], keep_callable)
        restored = self._restore_factors(extra["layers"])
        current = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        self._keep_state_dtypes(state_dict)
        for g, old in zip(self.param_groups, current):
            g.update(keep_callable(g, old))
            g["structures"] = tuple(g["structures"])
            g["preconditioner_dtype"] = tuple(
                resolve_dtype(d, "preconditioner_dtype") for d in g["preconditioner_dtype"]
            )
        self._after_load()
        for name, st in self._layers.items():
            mats = restored[name]
            st.K, st.C, st.m_K, st.m_C = mats["K"], mats["C"], mats["m_K"], mats["m_C"]
            self._refresh_grams(st, self._config(st.group).T)
            st.acc_K = st.acc_C = None
        self._step = int(extra["step"])
        self._sync_hooks()
