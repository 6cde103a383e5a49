"""One training function for notebooks, sweeps and benchmarks: :func:`train`.

Example::

    from experiments.training import train

    result = train("mlp", "singd", lr=1e-2, precision="bf16-pure", epochs=5,
                   optimizer_options={"structures": ("diagonal", "diagonal")})
    result.test_accuracy, result.losses, result.nan_events, result.recording

See :func:`train` for every argument and :class:`TrainResult` for what comes back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    @property
    def nan_event_count(self) -> int:
        """Number of NaN/Inf events (non-finite losses and non-finite final parameters)."""
        return len(self.nan_events)

    @property
    def diverged(self) -> bool:
        """Whether any NaN/Inf event happened or the optimizer gave up (``error``)."""
        return bool(self.nan_events) or self.error is not None

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
    workload: str | nn.Module = "mlp",
    optimizer: str = "adamw",
    *,
    lr: float | None = None,
    precision: str = "fp32",
    epochs: float | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    optimizer_options: Mapping[str, Any] | None = None,
    lr_cov_warmup: int = 0,
    fallback: str = "builtin",
    record: bool = False,
    record_every: int = 10,
    progress: bool = True,
    on_nan: str = "stop",
    data: DigitsData | None = None,
    device: str | torch.device = "cpu",
    num_threads: int | None = None,
) -> TrainResult:
    """Train a workload on the digits train split and report metrics on train/val/test.

    Args:
        workload: a name from ``experiments.workloads.WORKLOADS`` ("mlp", "cnn", "vit",
            "vit-mha", "vit-linear") or your own ``nn.Module`` taking (N, 1, 8, 8) images.
        optimizer: "adamw", "sgd" (momentum 0.9 unless given), "kfac" (``singd.KFAC``),
            "singd" (``singd.SINGD``) or "ikfac" (``SINGD(kfac_like=True, alpha1=0)``).
        lr: learning rate; ``None`` takes ``DEFAULT_LR[optimizer]``.
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
        lr_cov_warmup: for SINGD/IKFAC, ramp ``lr_cov`` (default 1e-2) linearly from
            ``lr_cov / lr_cov_warmup`` to ``lr_cov`` over this many optimizer steps (0: off).
        fallback: for kfac/singd/ikfac, who trains the parameters outside ``nn.Linear`` /
            ``nn.Conv2d`` layers (LayerNorm, positional embeddings, ``nn.MultiheadAttention``):
            "builtin" (default): the optimizer's own first-order fallback (heavy-ball SGD);
            "adamw": a separate ``torch.optim.AdamW`` with the same ``lr`` (torch defaults
            otherwise), stepped right after the main optimizer; its state is counted in
            ``state_bytes["adamw_fallback"]`` and it is ``result.fallback_optimizer``.
        record: attach a ``diagnostics.record.recorder.Recorder`` (every ``record_every`` steps);
            the Recording comes back as ``result.recording``.
        progress: show a tqdm progress bar.
        on_nan: what a non-finite loss does. "stop" (default): the event is recorded and
            training ends at once (no backward, no step; the model keeps its last
            parameters and is evaluated as it is). "continue": the event is recorded and
            training goes on with backward and step as usual (a GradScaler will skip the
            step; other optimizers may carry the NaN into the parameters).
        data: the splits to use (default: ``load_digits_data()``).
        device: torch device to train on.
        num_threads: if given, ``torch.set_num_threads(num_threads)`` for this process.

    Returns:
        A :class:`TrainResult`. Non-finite parameters after the last step add one event
        with ``where="parameters"``. Invalid names raise a ``ValueError`` listing the
        valid ones before anything is built.
    """
    if isinstance(workload, str):
        _check_choice("workload", workload, tuple(WORKLOADS))
    elif not isinstance(workload, nn.Module):
        raise TypeError(f"workload must be a name or an nn.Module, got {type(workload).__name__}")
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("on_nan", on_nan, ON_NAN)
    _check_choice("fallback", fallback, FALLBACKS)
    if fallback != "builtin" and optimizer not in ("kfac", "singd", "ikfac"):
        raise ValueError("fallback='adamw' applies only to optimizer 'kfac', 'singd' or 'ikfac'")
    if epochs is not None and steps is not None:
        raise ValueError("give at most one of epochs and steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be positive, got {epochs!r}")
    if lr is None:
        lr = DEFAULT_LR[optimizer]
    if not (isinstance(lr, int | float) and lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
    if not isinstance(lr_cov_warmup, int) or lr_cov_warmup < 0:
        raise ValueError(f"lr_cov_warmup must be a non-negative int, got {lr_cov_warmup!r}")
    if lr_cov_warmup and optimizer not in ("singd", "ikfac"):
        raise ValueError("lr_cov_warmup applies only to optimizer 'singd' or 'ikfac'")
    if record_every < 1:
        raise ValueError(f"record_every must be >= 1, got {record_every!r}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)

    device = torch.device(device)
    data = data if data is not None else load_digits_data()
    options = dict(optimizer_options or {})
    opt_kwargs = dict(options)
    if lr_cov_warmup:
        opt_kwargs["lr_cov"] = LinearWarmup(opt_kwargs.get("lr_cov", 1e-2), lr_cov_warmup)
        options["lr_cov_warmup"] = lr_cov_warmup

    model = build_model(workload, seed) if isinstance(workload, str) else workload
    name = workload if isinstance(workload, str) else type(workload).__name__
    dtype, fwd_context, scaler = _precision_setup(precision, device)
    model.to(device=device, dtype=dtype)
    model.train()
    extra: list[torch.optim.Optimizer] = []
    if fallback == "adamw":
        from singd.capture import find_layers

        options["fallback"] = "adamw"
        trainable = [p for p in model.parameters() if p.requires_grad]
        search = find_layers(model, trainable)
        covered = {id(p) for layer in search.layers.values() for p in layer.params()}
        main_params = [p for p in trainable if id(p) in covered]
        others = [p for p in trainable if id(p) not in covered]
        opt = make_optimizer(optimizer, model, lr, opt_kwargs, params=main_params)
        if others:
            extra.append(torch.optim.AdamW(others, lr=lr))
    else:
        opt = make_optimizer(optimizer, model, lr, opt_kwargs)

    recorder = None
    if record:
        from diagnostics.record.recorder import Recorder

        config = {
            "workload": name,
            "optimizer": optimizer,
            "precision": precision,
            "lr": lr,
            "batch_size": batch_size,
            **{
                k: v if isinstance(v, int | float | str | bool) else repr(v)
                for k, v in options.items()
            },
        }
        recorder = Recorder(
            opt,
            model,
            every=record_every,
            scaler=scaler,
            name=f"{name}/{optimizer}/{precision}/seed{seed}",
            config=config,
            seed=seed,
        )

    loader = BatchLoader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed)
    per_epoch = len(loader)
    total = steps if steps is not None else max(1, round((epochs or 10) * per_epoch))

    result = TrainResult(
        workload=name, optimizer_name=optimizer, precision=precision, seed=seed, lr=lr,
        options=options,
    )  # fmt: skip

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{name}/{optimizer}/{precision}", leave=False)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    M.reset_peak_rss()
    rss_start = M.read_status_bytes("VmRSS") or 0
    step_times: list[float] = []
    peak_rss = 0  # bytes, the maximum VmHWM read while training
    t_start = time.perf_counter()
    step = 0
    try:
        while step < total and not result.stopped_early:
            for xb, yb in loader:
                if step >= total:
                    break
                xb = xb.to(device=device, dtype=dtype)
                yb = yb.to(device)
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                for o in extra:
                    o.zero_grad(set_to_none=True)
                with fwd_context():
                    logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                loss_value = float(loss.detach())
                finite = math.isfinite(loss_value)
                result.losses.append(loss_value if finite else float("nan"))
                if not finite:
                    result.nan_events.append({"step": step, "where": "loss", "value": loss_value})
                    if on_nan == "stop":
                        result.stopped_early = True
                        if recorder is not None:  # the recorder sees the step it stopped at
                            peak_rss = max(peak_rss, M.read_peak_rss() or 0)
                            recorder.step(loss=loss.detach())
                        break
                try:
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scale_before = scaler.get_scale()
                        scaler.step(opt)
                        for o in extra:
                            scaler.step(o)
                        scaler.update()
                        if scaler.get_scale() < scale_before:
                            result.skipped_steps += 1
                    else:
                        loss.backward()
                        opt.step()
                        for o in extra:
                            o.step()
                except _OPTIMIZER_FAILURES as err:
                    result.error = f"step {step}: {type(err).__name__}: {err}"
                    result.stopped_early = True
                    if recorder is not None:  # the events table and timeline show why
                        recorder.record_error(err, phase="preconditioner update")
                    break
                step_times.append(time.perf_counter() - t0)
                if recorder is not None:
                    # the recorder resets the peak on its recorded steps: read it first
                    peak_rss = max(peak_rss, M.read_peak_rss() or 0)
                    recorder.step(loss=loss.detach())
                step += 1
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step == total:
                        bar.set_postfix(loss=f"{loss_value:.4g}")
            if not result.stopped_early:
                result.val_accuracy_curve.append(
                    evaluate(model, data.x_val, data.y_val, dtype=dtype, context=fwd_context)
                )
    finally:
        if bar is not None:
            bar.close()
        if recorder is not None:
            peak_rss = max(peak_rss, M.read_peak_rss() or 0)
            recorder.close()
    result.total_time = time.perf_counter() - t_start
    if device.type == "cuda":
        result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
        result.peak_memory_increase_bytes = result.peak_memory_bytes
    else:
        peak = max(peak_rss, M.read_peak_rss() or 0)
        result.peak_memory_bytes = peak
        result.peak_memory_increase_bytes = max(0, peak - rss_start)

    result.steps = step
    result.epochs_completed = step / per_epoch
    timed = step_times[1:] if len(step_times) > 1 else step_times
    result.time_per_step = sum(timed) / len(timed) if timed else float("nan")
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        result.nan_events.append({"step": step, "where": "parameters", "value": float("nan")})
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        acc = evaluate(model, x, y, dtype=dtype, context=fwd_context)
        setattr(result, f"{split}_accuracy", acc)
    if scaler is not None:
        result.grad_scale = float(scaler.get_scale())
    result.state_bytes = optimizer_state_bytes(opt)
    for o in extra:
        comps: dict[str, int] = {}
        for layer in optimizer_state_bytes(o).values():
            for comp, b in layer.items():
                comps[comp] = comps.get(comp, 0) + b
        result.state_bytes["adamw_fallback"] = comps
    result.optimizer_state_bytes = sum(sum(c.values()) for c in result.state_bytes.values())
    if recorder is not None:
        result.recording = recorder.recording
        result.recording.summary.update(
            {k: v for k, v in result.summary().items() if k not in ("options", "error")}
        )
        if result.error:
            result.recording.summary["error"] = result.error
    result.model = model
    result.optimizer = opt
    result.fallback_optimizer = extra[0] if extra else None
    return result
