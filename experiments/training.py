"""One training function for notebooks, sweeps and benchmarks: :func:`train` of a :class:`RunSpec`.

Example::

    from experiments.training import RunSpec, train

    spec = RunSpec("mlp", "singd", lr=1e-2, precision="bf16-pure", epochs=5,
                   structures=("diagonal", "diagonal"))
    result = train(spec)            # or train("mlp", "singd", lr=1e-2, ...) with keywords
    result.test_accuracy, result.losses, result.nan_events, result.recording

See :class:`RunSpec` for every argument and :class:`TrainResult` for what comes back.
:func:`train` is split into building (`_build`), the loop (`_loop`, `_train_step`),
evaluation (`_evaluate_run`) and recording (`_attach_recording`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diagnostics import RunSummary, run_status, run_summary
from diagnostics.record import metrics as M
from experiments.workloads import WORKLOADS, BatchLoader, DigitsData, build_model, load_digits_data

#: Optimizer names accepted by :func:`train`.
OPTIMIZERS = ("adamw", "sgd", "kfac", "singd", "ikfac")
#: Precision modes accepted by :func:`train`.
PRECISIONS = ("fp32", "bf16-autocast", "bf16-pure", "fp16-autocast")
#: What to do after a non-finite loss: end the run, or keep stepping.
ON_NAN = ("stop", "continue")
#: Who trains parameters outside Linear/Conv2d layers under kfac/singd/ikfac.
FALLBACKS = ("builtin", "adamw")

#: Learning rates used when ``lr`` is not given.
DEFAULT_LR: dict[str, float] = {
    "adamw": 1e-3,
    "sgd": 1e-2,
    "kfac": 1e-2,
    "singd": 1e-2,
    "ikfac": 1e-2,
}


class LinearWarmup:
    """A picklable schedule ``step -> peak * min(1, (step + 1) / steps)`` (e.g. for ``lr_cov``)."""

    def __init__(self, peak: float, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"warm-up steps must be >= 1, got {steps!r}")
        self.peak = float(peak)
        self.steps = int(steps)

    def __call__(self, step: int) -> float:
        return self.peak * min(1.0, (step + 1) / self.steps)

    def __repr__(self) -> str:
        return f"LinearWarmup(peak={self.peak}, steps={self.steps})"


@dataclass
class TrainResult:
    """What :func:`train` returns: settings, metrics, the trained model and the recording.

    ``losses`` holds the training loss of every step (``nan`` where it was not finite);
    ``nan_events`` one dict per event (``step``, ``where`` in {"loss", "parameters"},
    ``value``); ``nan_event_count`` their number; ``error`` the message of an optimizer
    failure that ended the run (KFAC's ``KFACInverseError``: a factor that cannot be
    inverted under ``on_inverse_failure="raise"`` or even after upcasting), else None;
    ``diverged`` whether either happened.
    ``time_per_step`` is the mean wall time of forward + backward + step in seconds,
    first step excluded (warm-up). ``peak_memory_bytes`` is the process peak resident
    memory while training (VmHWM, reset at the start, Linux) or
    ``torch.cuda.max_memory_allocated`` on CUDA; ``peak_memory_increase_bytes`` subtracts
    the resident memory at the start. ``skipped_steps`` counts steps a GradScaler skipped
    (fp16-autocast) and ``grad_scale`` is its final scale (else None).
    ``optimizer_state_bytes`` is the total of
    ``optimizer.state_bytes()`` for SINGD/KFAC and of all state tensors otherwise, with
    its per-component breakdown in ``state_bytes``. ``recording`` is the
    ``diagnostics.record.recorder`` Recording when ``record=True``, else ``None``.
    """

    workload: str
    optimizer_name: str
    precision: str
    seed: int
    lr: float
    options: dict[str, Any]
    steps: int = 0
    epochs_completed: float = 0.0
    losses: list[float] = field(default_factory=list)
    val_accuracy_curve: list[float] = field(default_factory=list)
    train_accuracy: float = float("nan")
    val_accuracy: float = float("nan")
    test_accuracy: float = float("nan")
    final_loss: float = float("nan")
    nan_events: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    error: str | None = None
    skipped_steps: int = 0
    grad_scale: float | None = None
    time_per_step: float = float("nan")
    total_time: float = float("nan")
    peak_memory_bytes: int = 0
    peak_memory_increase_bytes: int = 0
    optimizer_state_bytes: int = 0
    state_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    recording: Any = None
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    fallback_optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    spec: RunSpec | None = field(default=None, repr=False)

    @property
    def nan_event_count(self) -> int:
        """Number of NaN/Inf events (non-finite losses and non-finite final parameters)."""
        return len(self.nan_events)

    @property
    def diverged(self) -> bool:
        """Whether any NaN/Inf event happened or the optimizer gave up (``error``)."""
        return bool(self.nan_events) or self.error is not None

    @property
    def status(self) -> str:
        """The run's status by the one rule of ``diagnostics.run_status``: "ok", "diverged"
        (a NaN/Inf), or "failed" (the optimizer gave up, ``error``)."""
        return run_status(
            error=self.error, diverged=self.diverged, stopped_early=self.stopped_early
        )

    def run_summary(self) -> RunSummary:
        """The ``diagnostics.RunSummary`` of the run's recording (needs ``record=True``)."""
        if self.recording is None:
            raise ValueError("run_summary needs the run's recording: train with record=True")
        return run_summary(self.recording)

    def summary(self) -> dict[str, Any]:
        """A flat dict of settings and scalar metrics, one row of a results table."""
        return {
            "workload": self.workload,
            "optimizer": self.optimizer_name,
            "precision": self.precision,
            "seed": self.seed,
            "lr": self.lr,
            "options": repr(self.options),
            "steps": self.steps,
            "epochs": self.epochs_completed,
            "final_loss": self.final_loss,
            "train_accuracy": self.train_accuracy,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "nan_events": self.nan_event_count,
            "diverged": self.diverged,
            "stopped_early": self.stopped_early,
            "error": self.error,
            "skipped_steps": self.skipped_steps,
            "time_per_step": self.time_per_step,
            "total_time": self.total_time,
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_increase_bytes": self.peak_memory_increase_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
        }


#: Optimizers that precondition layers (and have a first-order fallback for the rest).
_SECOND_ORDER = ("kfac", "singd", "ikfac")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run, checked when it is built.

    Build one and pass it to :func:`train` (``train(spec)``, or ``train(spec, seed=1)`` to
    change a field), or give the same names as keywords (``train("mlp", "singd", lr=1e-2)``).
    ``dataclasses.replace(spec, ...)`` gives a checked variant. Invalid values raise a
    ``ValueError`` (a ``TypeError`` for a workload of the wrong type) naming the argument
    and its valid values, before anything is built.

    Fields:
        workload: a name from ``experiments.workloads.WORKLOADS`` ("mlp", "cnn", "vit",
            "vit-mha", "vit-linear") or your own ``nn.Module`` taking (N, 1, 8, 8) images.
        optimizer: "adamw", "sgd" (momentum 0.9 unless given), "kfac" (``singd.KFAC``),
            "singd" (``singd.SINGD``) or "ikfac" (``SINGD(kfac_like=True, alpha1=0)``).
        lr: learning rate; ``None`` takes ``DEFAULT_LR[optimizer]`` (see `learning_rate`).
        precision: "fp32"; "bf16-autocast" (fp32 model, bf16 autocast forward);
            "bf16-pure" (model, inputs, gradients and optimizer state in bf16; the loss
            is computed from the bf16 logits upcast to fp32); "fp16-autocast" (fp32
            model, fp16 autocast forward, ``torch.amp.GradScaler``, ``scaler.step(opt)``).
        epochs / steps: training length; give at most one (``steps`` counts optimizer
            steps, ``epochs`` may be fractional); neither means 10 epochs.
        batch_size: mini-batch size (the last batch of an epoch may be smaller).
        seed: seeds the model initialisation and the batch order.
        optimizer_options: extra keyword arguments for the optimizer, e.g.
            ``{"structures": ("diagonal", "dense"), "damping": 1e-3, "T": 1}`` for SINGD,
            ``{"factor_dtype": "bfloat16"}`` for KFAC, ``{"weight_decay": 0}`` for AdamW.
        structures: for SINGD/IKFAC, the (K, C) structure names; the same as
            ``optimizer_options={"structures": ...}`` (give it in one place only).
        lr_cov_warmup: for SINGD/IKFAC, ramp ``lr_cov`` (default 1e-2) linearly from
            ``lr_cov / lr_cov_warmup`` to ``lr_cov`` over this many optimizer steps (0: off).
        fallback: for kfac/singd/ikfac, who trains the parameters the optimizer does not
            precondition (LayerNorm, positional embeddings, ...): "builtin" (default): the
            optimizer's own first-order fallback (its ``fallback`` option, AdamW unless
            ``optimizer_options`` says otherwise); "adamw": a separate
            ``torch.optim.AdamW`` with the same ``lr`` (torch defaults otherwise) for every
            parameter outside ``nn.Linear`` / ``nn.Conv2d`` layers (so also attention and
            embeddings), stepped right after the main optimizer; its state is counted in
            ``state_bytes["adamw_fallback"]`` and it is ``result.fallback_optimizer``.
        record: attach a ``diagnostics.Recorder`` (every ``record_every`` steps); the
            Recording comes back as ``result.recording``.
        progress: show a tqdm progress bar.
        on_nan: what a non-finite loss does. "stop" (default): the event is recorded and
            training ends at once (no backward, no step; the model keeps its last
            parameters and is evaluated as it is). "continue": the event is recorded and
            training goes on with backward and step as usual (a GradScaler will skip the
            step; other optimizers may carry the NaN into the parameters).
        data: the splits to use (default: ``load_digits_data()``).
        device: torch device to train on.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` for this process.
    """

    workload: str | nn.Module = "mlp"
    optimizer: str = "adamw"
    lr: float | None = None
    precision: str = "fp32"
    epochs: float | None = None
    steps: int | None = None
    batch_size: int = 64
    seed: int = 0
    optimizer_options: Mapping[str, Any] | None = None
    structures: tuple[str, str] | None = None
    lr_cov_warmup: int = 0
    fallback: str = "builtin"
    record: bool = False
    record_every: int = 10
    progress: bool = True
    on_nan: str = "stop"
    data: DigitsData | None = field(default=None, repr=False, compare=False)
    device: str | torch.device = "cpu"
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.structures is not None:
            object.__setattr__(self, "structures", tuple(self.structures))
        self._check_names()
        self._check_numbers()

    def _check_names(self) -> None:
        """Check the fields chosen from a list of names."""
        if isinstance(self.workload, str):
            _check_choice("workload", self.workload, tuple(WORKLOADS))
        elif not isinstance(self.workload, nn.Module):
            kind = type(self.workload).__name__
            raise TypeError(f"workload must be a name or an nn.Module, got {kind}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("on_nan", self.on_nan, ON_NAN)
        _check_choice("fallback", self.fallback, FALLBACKS)
        if self.fallback != "builtin" and self.optimizer not in _SECOND_ORDER:
            raise ValueError(
                "fallback='adamw' applies only to optimizer 'kfac', 'singd' or 'ikfac'"
            )
        if self.structures is not None:
            if self.optimizer not in ("singd", "ikfac"):
                raise ValueError("structures applies only to optimizer 'singd' or 'ikfac'")
            if len(self.structures) != 2 or not all(isinstance(n, str) for n in self.structures):
                raise ValueError(
                    f"structures must be a (K, C) pair of structure names, got {self.structures!r}"
                )
            if "structures" in (self.optimizer_options or {}):
                raise ValueError("give structures or optimizer_options['structures'], not both")

    def _check_numbers(self) -> None:
        """Check the numeric fields (training length, lr, schedule, batch and record sizes)."""
        steps, epochs, lr = self.steps, self.epochs, self.lr
        if epochs is not None and steps is not None:
            raise ValueError("give at most one of epochs and steps")
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if epochs is not None and not epochs > 0:
            raise ValueError(f"epochs must be positive, got {epochs!r}")
        if lr is not None and not (_is_number(lr) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
        if not _is_int(self.lr_cov_warmup) or self.lr_cov_warmup < 0:
            raise ValueError(
                f"lr_cov_warmup must be a non-negative int, got {self.lr_cov_warmup!r}"
            )
        if self.lr_cov_warmup and self.optimizer not in ("singd", "ikfac"):
            raise ValueError("lr_cov_warmup applies only to optimizer 'singd' or 'ikfac'")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not _is_int(self.record_every) or self.record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {self.record_every!r}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise ValueError(
                f"num_threads must be a positive int or None, got {self.num_threads!r}"
            )

    @property
    def name(self) -> str:
        """The workload's name (the class name of a model given as an ``nn.Module``)."""
        return self.workload if isinstance(self.workload, str) else type(self.workload).__name__

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default (`DEFAULT_LR`) when it is None."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``steps``, else ``epochs`` (default 10) of batches."""
        if self.steps is not None:
            return self.steps
        return max(1, round((self.epochs or 10) * batches_per_epoch))


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an int (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (and not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def run_spec(
    spec: RunSpec | str | nn.Module | None = None,
    optimizer: str | None = None,
    /,
    **overrides: Any,
) -> RunSpec:
    """The :class:`RunSpec` that :func:`train` runs: ``spec`` (a RunSpec, or a workload)
    with ``optimizer`` and the keyword ``overrides`` applied; unknown names raise TypeError."""
    unknown = sorted(set(overrides) - set(RUN_SPEC_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown run argument(s) {unknown}; the arguments are {list(RUN_SPEC_FIELDS)}"
        )
    changes = dict(overrides)
    for key, value in (("workload", spec), ("optimizer", optimizer)):
        if value is None or isinstance(value, RunSpec):
            continue
        if key in changes:
            raise TypeError(f"{key} given both by position and by keyword")
        changes[key] = value
    if isinstance(spec, RunSpec):
        return dataclasses.replace(spec, **changes) if changes else spec
    return RunSpec(**changes)


#: The names a run spec (and :func:`train`) accepts, in order.
RUN_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))


def _optimizer_failures() -> tuple[type[BaseException], ...]:
    """Exceptions that end a run as a recorded failure instead of crashing it."""
    try:
        from singd.kfac import KFACInverseError
    except ImportError:  # pragma: no cover - singd always ships kfac
        return ()
    return (KFACInverseError,)


_OPTIMIZER_FAILURES = _optimizer_failures()


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    options: Mapping[str, Any] | None = None,
    params: list[Tensor] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (see :data:`OPTIMIZERS`) for ``model`` with ``options``
    (over ``params`` when given, else all trainable parameters)."""
    _check_choice("optimizer", name, OPTIMIZERS)
    opts = dict(options or {})
    if params is not None:
        opts["params"] = params
    if name in ("adamw", "sgd"):
        ps = opts.pop("params", None) or [p for p in model.parameters() if p.requires_grad]
        if name == "adamw":
            return torch.optim.AdamW(ps, lr=lr, **opts)
        opts.setdefault("momentum", 0.9)
        return torch.optim.SGD(ps, lr=lr, **opts)
    if name == "kfac":
        from singd.kfac import KFAC

        return KFAC(model, lr=lr, **opts)
    from singd import SINGD

    if name == "ikfac":
        if opts.get("kfac_like") is False:
            raise ValueError("optimizer='ikfac' means SINGD(kfac_like=True); drop kfac_like=False")
        opts["kfac_like"] = True
        opts.setdefault("alpha1", 0.0)
    return SINGD(model, lr=lr, **opts)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Optimizer state bytes per layer (or parameter) and component."""
    if hasattr(optimizer, "state_bytes"):
        return {k: dict(v) for k, v in optimizer.state_bytes().items()}
    out: dict[str, dict[str, int]] = {}
    for i, (_, state) in enumerate(optimizer.state.items()):
        out[f"param{i}"] = M.state_bytes_by_key(state)
    return out


def _precision_setup(
    precision: str, device: torch.device
) -> tuple[torch.dtype, Callable[[], contextlib.AbstractContextManager], Any]:
    """Model dtype, a factory of forward contexts and a GradScaler (or None) for ``precision``."""
    if precision == "fp32":
        return torch.float32, contextlib.nullcontext, None
    if precision == "bf16-pure":
        return torch.bfloat16, contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16-autocast" else torch.float16

    def ctx() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype)

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-autocast" else None
    return torch.float32, ctx, scaler


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    batch_size: int = 512,
) -> float:
    """Classification accuracy of ``model`` on ``(x, y)`` (non-finite logits count as wrong)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device=device, dtype=dtype)
        yb = y[i : i + batch_size].to(device)
        with context():
            logits = model(xb).float()
        ok = (logits.argmax(dim=1) == yb) & torch.isfinite(logits).all(dim=1)
        correct += int(ok.sum())
    model.train(was_training)
    return correct / max(1, len(x))


def train(
    spec: RunSpec | str | nn.Module | None = None,
    optimizer: str | None = None,
    /,
    **overrides: Any,
) -> TrainResult:
    """Train a workload on the digits train split and report metrics on train/val/test.

    ``spec`` is a :class:`RunSpec` (``train(spec)``, or ``train(spec, seed=1)`` with
    overrides) or a workload, with the optimizer second and the other :class:`RunSpec`
    fields as keywords: ``train("mlp", "singd", lr=1e-2, steps=50)``. Invalid values raise
    a ``ValueError`` naming the argument and its valid values before anything is built.

    Returns:
        A :class:`TrainResult`. Non-finite parameters after the last step add one event
        with ``where="parameters"``.
    """
    spec = run_spec(spec, optimizer, **overrides)
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    run = _build(spec)
    result = TrainResult(
        workload=spec.name, optimizer_name=spec.optimizer, precision=spec.precision,
        seed=spec.seed, lr=spec.learning_rate, options=run.options, spec=spec,
    )  # fmt: skip
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    M.reset_peak_rss()
    rss_start = M.read_status_bytes("VmRSS") or 0
    t_start = time.perf_counter()
    try:
        step, per_epoch = _loop(run, result)
    finally:
        if run.recorder is not None:
            run.read_peak_rss()
            run.recorder.close()
    result.total_time = time.perf_counter() - t_start
    _measure_memory(run, result, rss_start)
    _evaluate_run(run, result, step, per_epoch)
    _count_state_bytes(run, result)
    if run.recorder is not None:
        _attach_recording(run.recorder.recording, result)
    result.model = run.model
    result.optimizer = run.optimizer
    result.fallback_optimizer = run.extra[0] if run.extra else None
    return result


@dataclass
class _Run:
    """What one run is being trained with: built by `_build`, used by the loop and the
    evaluation; ``step_times`` and ``peak_rss`` (bytes) are filled while training."""

    spec: RunSpec
    data: DigitsData
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    context: Callable[[], contextlib.AbstractContextManager]
    scaler: Any
    optimizer: torch.optim.Optimizer
    extra: list[torch.optim.Optimizer]
    options: dict[str, Any]
    recorder: Any = None
    step_times: list[float] = field(default_factory=list)
    peak_rss: int = 0
    last_loss: float = float("nan")

    def read_peak_rss(self) -> None:
        """Fold the process peak memory into ``peak_rss`` (the recorder resets the peak on
        its recorded steps, so it is read before each of them)."""
        self.peak_rss = max(self.peak_rss, M.read_peak_rss() or 0)


def _build(spec: RunSpec) -> _Run:
    """Load the data, build the model in its precision, its optimizer(s) and the recorder."""
    device = torch.device(spec.device)
    data = spec.data if spec.data is not None else load_digits_data()
    options = dict(spec.optimizer_options or {})
    if spec.structures is not None:
        options["structures"] = spec.structures
    opt_kwargs = dict(options)
    if spec.lr_cov_warmup:
        opt_kwargs["lr_cov"] = LinearWarmup(opt_kwargs.get("lr_cov", 1e-2), spec.lr_cov_warmup)
        options["lr_cov_warmup"] = spec.lr_cov_warmup
    if isinstance(spec.workload, str):
        model = build_model(spec.workload, spec.seed)
    else:
        model = spec.workload
    dtype, context, scaler = _precision_setup(spec.precision, device)
    model.to(device=device, dtype=dtype)
    model.train()
    opt, extra = _build_optimizers(spec, model, opt_kwargs)
    if spec.fallback == "adamw":
        options["fallback"] = "adamw"
    run = _Run(spec, data, model, device, dtype, context, scaler, opt, extra, options)
    if spec.record:
        run.recorder = _make_recorder(run)
    return run


def _build_optimizers(
    spec: RunSpec, model: nn.Module, opt_kwargs: dict[str, Any]
) -> tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]:
    """The main optimizer and, with ``fallback="adamw"``, an AdamW for the parameters
    outside the layers the main optimizer preconditions."""
    lr = spec.learning_rate
    if spec.fallback != "adamw":
        return make_optimizer(spec.optimizer, model, lr, opt_kwargs), []
    from singd.capture import find_layers

    trainable = [p for p in model.parameters() if p.requires_grad]
    search = find_layers(model, trainable)
    covered = {id(p) for layer in search.layers.values() for p in layer.params()}
    main_params = [p for p in trainable if id(p) in covered]
    others = [p for p in trainable if id(p) not in covered]
    opt = make_optimizer(spec.optimizer, model, lr, opt_kwargs, params=main_params)
    return opt, [torch.optim.AdamW(others, lr=lr)] if others else []


def _make_recorder(run: _Run) -> Any:
    """A ``diagnostics.Recorder`` on the run's optimizer and model, its config the spec."""
    from diagnostics.record.recorder import Recorder

    spec = run.spec
    config = {
        "workload": spec.name,
        "optimizer": spec.optimizer,
        "precision": spec.precision,
        "lr": spec.learning_rate,
        "batch_size": spec.batch_size,
        **{
            k: v if isinstance(v, int | float | str | bool) else repr(v)
            for k, v in run.options.items()
        },
    }
    return Recorder(
        run.optimizer,
        run.model,
        every=spec.record_every,
        scaler=run.scaler,
        name=f"{spec.name}/{spec.optimizer}/{spec.precision}/seed{spec.seed}",
        config=config,
        seed=spec.seed,
    )


def _loop(run: _Run, result: TrainResult) -> tuple[int, int]:
    """Train epoch after epoch (validation accuracy after each full one) until the run's
    step count, a stopping NaN/Inf or an optimizer failure; returns the steps taken and
    the batches per epoch."""
    spec = run.spec
    loader = BatchLoader(
        run.data.x_train, run.data.y_train, spec.batch_size, shuffle=True, seed=spec.seed
    )
    total = spec.total_steps(len(loader))
    bar = None
    if spec.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{spec.name}/{spec.optimizer}/{spec.precision}", leave=False)
    step = 0
    try:
        while step < total and not result.stopped_early:
            for xb, yb in loader:
                if step >= total or not _train_step(run, result, xb, yb, step):
                    break
                step += 1
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step == total:
                        bar.set_postfix(loss=f"{run.last_loss:.4g}")
            if not result.stopped_early:
                x, y = run.data.x_val, run.data.y_val
                result.val_accuracy_curve.append(
                    evaluate(run.model, x, y, dtype=run.dtype, context=run.context)
                )
    finally:
        if bar is not None:
            bar.close()
    return step, len(loader)


def _train_step(run: _Run, result: TrainResult, xb: Tensor, yb: Tensor, step: int) -> bool:
    """One forward, backward and optimizer step on a batch; False when the run stops here
    (a non-finite loss under ``on_nan="stop"``, or an optimizer failure)."""
    xb = xb.to(device=run.device, dtype=run.dtype)
    yb = yb.to(run.device)
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    for o in run.extra:
        o.zero_grad(set_to_none=True)
    with run.context():
        logits = run.model(xb)
    loss = F.cross_entropy(logits.float(), yb)
    run.last_loss = loss_value = float(loss.detach())
    finite = math.isfinite(loss_value)
    result.losses.append(loss_value if finite else float("nan"))
    if not finite:
        result.nan_events.append({"step": step, "where": "loss", "value": loss_value})
        if run.spec.on_nan == "stop":
            result.stopped_early = True
            _record_step(run, loss)  # the recorder sees the step it stopped at
            return False
    try:
        _backward_and_step(run, result, loss)
    except _OPTIMIZER_FAILURES as err:
        result.error = f"step {step}: {type(err).__name__}: {err}"
        result.stopped_early = True
        if run.recorder is not None:  # the events table and timeline show why
            run.recorder.record_error(err, phase="preconditioner update")
        return False
    run.step_times.append(time.perf_counter() - t0)
    _record_step(run, loss)
    return True


def _backward_and_step(run: _Run, result: TrainResult, loss: Tensor) -> None:
    """Backward and step of every optimizer, through the GradScaler when there is one
    (a step it skips, seen as a lowered scale, counts in ``skipped_steps``)."""
    scaler = run.scaler
    if scaler is None:
        loss.backward()
        run.optimizer.step()
        for o in run.extra:
            o.step()
        return
    scaler.scale(loss).backward()
    scale_before = scaler.get_scale()
    scaler.step(run.optimizer)
    for o in run.extra:
        scaler.step(o)
    scaler.update()
    if scaler.get_scale() < scale_before:
        result.skipped_steps += 1


def _record_step(run: _Run, loss: Tensor) -> None:
    """Hand the step to the recorder (if any), reading the peak memory first."""
    if run.recorder is not None:
        run.read_peak_rss()
        run.recorder.step(loss=loss.detach())


def _measure_memory(run: _Run, result: TrainResult, rss_start: int) -> None:
    """Peak memory while training: CUDA's allocator peak, else the process peak (VmHWM)."""
    if run.device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(run.device))
        result.peak_memory_increase_bytes = result.peak_memory_bytes
    else:
        run.read_peak_rss()
        result.peak_memory_bytes = run.peak_rss
        result.peak_memory_increase_bytes = max(0, run.peak_rss - rss_start)


def _evaluate_run(run: _Run, result: TrainResult, step: int, per_epoch: int) -> None:
    """Steps, epochs, mean step time (first step excluded), final loss, non-finite
    parameters and the train/val/test accuracies of the trained model."""
    result.steps = step
    result.epochs_completed = step / per_epoch
    timed = run.step_times[1:] if len(run.step_times) > 1 else run.step_times
    result.time_per_step = sum(timed) / len(timed) if timed else float("nan")
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
        result.nan_events.append({"step": step, "where": "parameters", "value": float("nan")})
    for split in ("train", "val", "test"):
        x, y = run.data.split(split)
        acc = evaluate(run.model, x, y, dtype=run.dtype, context=run.context)
        setattr(result, f"{split}_accuracy", acc)
    if run.scaler is not None:
        result.grad_scale = float(run.scaler.get_scale())


def _count_state_bytes(run: _Run, result: TrainResult) -> None:
    """Optimizer state bytes per layer and component, the AdamW fallback's as one entry."""
    result.state_bytes = optimizer_state_bytes(run.optimizer)
    for o in run.extra:
        comps: dict[str, int] = {}
        for layer in optimizer_state_bytes(o).values():
            for comp, b in layer.items():
                comps[comp] = comps.get(comp, 0) + b
        result.state_bytes["adamw_fallback"] = comps
    result.optimizer_state_bytes = sum(sum(c.values()) for c in result.state_bytes.values())


def _attach_recording(recording: Any, result: TrainResult) -> None:
    """Put the run's numbers into the recording's summary and the recording into the result."""
    result.recording = recording
    recording.summary.update(
        {k: v for k, v in result.summary().items() if k not in ("options", "error")}
    )
    if result.error:
        recording.summary["error"] = result.error
