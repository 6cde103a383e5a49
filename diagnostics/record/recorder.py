"""`Recorder`: hooks a training loop and records spectra, norms, NaN/Inf events and memory.

Usage (any ``torch.optim`` optimizer, `singd.SINGD` or `singd.KFAC`)::

    with Recorder(optimizer, model, every=10, scaler=scaler) as rec:
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            rec.step(loss=loss)          # once per training step, after optimizer.step()
    rec.recording.save("run.rec")

An error that ends training (e.g. KFAC's ``KFACInverseError``) can be recorded with
``rec.record_error(err, phase="preconditioner update")``: it becomes an event row whose
``message`` says why.

The recorder is a scheduler over quantities (`diagnostics.record.quantities`: step
scalars, factor spectra, optimizer state, events, memory). It owns the schedule
``every``, the per-step hooks (`diagnostics.record.hooks`), the fused norm pass, the
change caches (`diagnostics.record.cache`), the spectra worker thread
(`diagnostics.record.worker`) and building the `Recording`. See docs/architecture.md,
"diagnostics.record: instrumentation".

What it costs, by step kind:

- **unrecorded steps**: a clock read and a finiteness check chosen by ``check_finite``:
  ``"loss"`` (default): the loss only (one host sync on GPU, none on CPU); ``"grads"``
  (also ``True``): the loss and every gradient (one grouped ``torch._foreach_norm`` read
  with one host sync); ``False``: nothing. A step that the GradScaler skipped
  (``optimizer.step()`` was not called) is always inspected. No hooks are installed on
  these steps. With ``"loss"``, a NaN/Inf born in the forward pass is caught at its step
  (it reaches the loss); one born in the backward pass without a GradScaler is caught one
  step later, when the updated parameters make the loss non-finite (its events then say
  ``parameter update`` at the next step); ``"grads"`` catches it at its own step.
- **recorded steps** (the schedule ``every``): forward hooks and output-gradient tensor hooks
  on every module that owns parameters are installed just for this step; at `step` the
  recorder reads the loss, gradients, parameters, the update (parameters before/after
  ``optimizer.step()``, snapshotted by a step pre-hook), optimizer state, factors (through
  ``preconditioner_factors()`` when the optimizer has it), and memory. All their norms
  (and the finiteness of the hooked tensors) come from one fused ``torch._foreach_norm``
  with one host read; a factor unchanged since the last recorded step keeps its norms.
- **spectra** (``spectra=True``, recorded steps): see `quantities.factors`; a factor
  unchanged since its last decomposition (SINGD changes K and C only every T steps) is
  not decomposed again: its spectrum is recorded again for the new step. A decomposition
  can cost more than a training step (numbers in ``benchmarks/RESULTS.md``, "Recorder
  overhead"); with ``workers="auto"`` (default) it runs on a worker thread when this
  process may use more CPUs than torch's intra-op threads (see `auto_workers`).
- a tripped finiteness check on an unrecorded step gets the same detailed inspection of
  loss, gradients, parameters, factors and state (phases ``forward``, ``backward``,
  ``preconditioner update``, ``parameter update``), and arms the hooks for the next step so
  that the forward/backward origin is caught there.

Optimizer state is read through the public view only: ``preconditioner_factors()`` and
``state_bytes()`` when present (SINGD, KFAC); otherwise ``optimizer.state`` (the public
``torch.optim`` state, e.g. AdamW's ``exp_avg``/``exp_avg_sq``). Everything is read-only:
norms and counts are reductions over the tensors (16-bit ones accumulated in float32),
spectra are computed on upcast copies (float32 or float64, never in place); training
numbers are never modified, and the hooks return nothing. Hooks are added and removed per
recorded step, which makes a ``torch.compile``d model see two hook configurations (two
compiled variants).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from diagnostics.record import metrics as M
from diagnostics.record.cache import ChangeCache
from diagnostics.record.hooks import ActivationHooks, Hooked
from diagnostics.record.quantities import (
    Events,
    FactorSpectra,
    Memory,
    OptimizerState,
    StepScalars,
    Tables,
)
from diagnostics.record.quantities.activations import Activations
from diagnostics.record.quantities.base import (
    MODEL,
    PROCESS,
    LayerIndex,
    MetricRow,
    Params,
    StepContext,
    fused_norms,
)
from diagnostics.record.quantities.events import GuardLog
from diagnostics.record.quantities.factors import SpectraJob
from diagnostics.record.quantities.flight import FlightRecorder
from diagnostics.record.quantities.rounding import Rounding
from diagnostics.record.quantities.step_scalars import loss_value
from diagnostics.record.recording import COLUMNS, PHASES, Recording, frame_from_rows
from diagnostics.record.worker import SpectraWorker, auto_workers

__all__ = ["MODEL", "PROCESS", "Recorder", "auto_workers", "make_schedule"]

Schedule = int | Iterable[int] | Callable[[int], bool]
Listener = Callable[["Recorder", int], None]


def make_schedule(every: Schedule) -> Callable[[int], bool]:
    """Turn ``every`` (N, a collection of steps, or a callable step -> bool) into a predicate."""
    if isinstance(every, bool):
        raise TypeError("every must be an int >= 1, a collection of step numbers or a callable")
    if isinstance(every, int):
        if every < 1:
            raise ValueError(f"every must be >= 1 (record every N steps), got {every}")
        return lambda step: step % every == 0
    if callable(every):
        return lambda step: bool(every(step))
    if isinstance(every, Iterable) and not isinstance(every, (str, bytes)):
        steps = set()
        for s in every:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise ValueError(f"every: step numbers must be ints >= 0, got {s!r}")
            steps.add(int(s))
        return steps.__contains__
    raise TypeError(
        "every must be an int >= 1, a collection of step numbers or a callable step -> bool, "
        f"got {type(every).__name__}"
    )


def _json_scalar(value: Any) -> Any:
    """A JSON-able version of a hyper-parameter value (repr for anything exotic)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (tuple, list)) and all(
        v is None or isinstance(v, (bool, int, float, str)) for v in value
    ):
        return list(value)
    return repr(value)


def _versions() -> dict[str, str]:
    """Versions of the libraries a recording depends on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("numpy", "pandas", "plotly"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    try:
        from importlib.metadata import version

        out["singd-lab"] = version("singd-lab")
    except Exception:  # pragma: no cover - not installed
        pass
    return out


def _check_arguments(
    optimizer: Any, model: Any, scaler: Any, max_dim: Any, power_iters: Any, config: Any
) -> None:
    """Refuse arguments of the wrong type or range with a message that says which."""
    if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "step"):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if scaler is not None and not hasattr(scaler, "get_scale"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not isinstance(max_dim, int) or max_dim < 1:
        raise ValueError(f"max_dim must be an int >= 1, got {max_dim!r}")
    if not isinstance(power_iters, int) or power_iters < 1:
        raise ValueError(f"power_iters must be an int >= 1, got {power_iters!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")


def _check_options(max_events: Any, flight: Any, step_norms: Any, budget: Any) -> None:
    """Refuse recorder options of the wrong type or range with a message that says which."""
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
        raise ValueError(f"max_events must be an int >= 0, got {max_events!r}")
    if isinstance(flight, bool) or not isinstance(flight, int) or flight < 0:
        raise ValueError(f"flight must be an int >= 0 (recorded steps kept), got {flight!r}")
    if step_norms not in (True, False, "grad"):
        raise ValueError(f"step_norms must be 'grad', True or False, got {step_norms!r}")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0
    ):
        raise ValueError(f"budget must be a fraction > 0 of training time or None, got {budget!r}")


def _check_finite_mode(check_finite: bool | str | None) -> str | bool:
    """``check_finite`` normalised to ``"grads"``, ``"loss"`` or False."""
    if check_finite is True:
        check_finite = "grads"
    if check_finite not in (False, None, "grads", "loss"):
        raise ValueError(
            f"check_finite must be 'grads' (or True), 'loss' or False, got {check_finite!r}"
        )
    return check_finite or False


def _worker_count(workers: int | str) -> tuple[int, bool]:
    """(threads, whether they were chosen by ``"auto"``) for the ``workers`` argument."""
    if workers == "auto":
        return auto_workers(), True
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be 'auto' or an int >= 0, got {workers!r}")
    return workers, False


class Recorder:
    """Records what a training run does, on a schedule, into a `Recording`.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (``singd.SINGD``/``singd.KFAC`` add factors).
        model: the trained ``nn.Module`` (names layers, gets forward/backward hooks); may be
            None, then parameters are named ``param{i}`` and activations are not inspected.
        every: record every N steps (steps 0, N, 2N, ...), a collection of step numbers, or
            a callable ``step -> bool``.
        spectra: compute factor spectra, extreme eigenvalues and condition numbers.
        events: detect NaN/Inf events.
        check_finite: the check on unrecorded steps: ``"loss"`` (loss only, default),
            ``"grads"`` (or True; loss and all gradients) or False (events only on
            recorded steps and skipped steps). Parameters, factors and state are checked
            on recorded steps and whenever the check trips.
        memory: record optimizer state bytes and peak process memory on recorded steps.
        scaler: a ``torch.amp.GradScaler``: its scale is read (``get_scale()``, at `step`,
            i.e. after ``scaler.update()`` when that ran first) into events and recorded
            steps. Skipped steps are found without it: ``optimizer.step()`` did not run.
        max_dim: factors larger than this get a power-iteration estimate of the extremes.
        power_iters: iterations of that estimate.
        name: run name (default: the optimizer's class name).
        config, seed: stored in ``recording.meta``.
        max_events: stop adding events after this many (a broken run repeats them each step).
        workers: threads that compute factor spectra from copies taken at the recorded
            step, while training goes on (0: compute them inside `step`); ``"auto"``
            (default): 1 where this process may use more CPUs than torch's intra-op
            threads, else 0 (`auto_workers`). At most ``workers + 1`` jobs are in flight
            (a recorded step waits when the thread falls that far behind). Results are
            merged in step order, and `recording` (hence saving, reports and dashboards),
            `flush` and `close` wait for pending ones, so what is read is always complete
            up to the last step.
        flight: how many recorded steps the flight recorder keeps copies of every factor
            for; at the first NaN/Inf event or error these copies and the factors at that
            step are saved as ``recording.snapshots`` (0: off).
        step_norms: what unrecorded steps record besides the loss: ``"grad"`` (default)
            the total gradient norm (one fused norm); True also the total update norm (a
            copy of the parameters before each ``optimizer.step()``: about 1 % of a step on
            a small Llama, hence not the default); False neither.
        budget: the largest fraction of training time the recorder may take, measured as
            it runs (its own time in `step`, plus spectra on the worker thread, against
            the time between `step` calls). On each recorded step it gives exact spectra
            to the factors that fit what is left (stalest, then cheapest, first) and
            power-iteration extremes to the other dense ones; ``recording.steps`` says how
            many of each (``spectra_exact``, ``spectra_estimated``). None: exact spectra
            for every changed factor (for teaching; costs what it costs).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        every: Schedule = 10,
        *,
        spectra: bool = True,
        events: bool = True,
        check_finite: bool | str = "loss",
        memory: bool = True,
        scaler: Any = None,
        max_dim: int = M.DEFAULT_MAX_DIM,
        power_iters: int = M.DEFAULT_POWER_ITERS,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        seed: int | None = None,
        max_events: int = 10_000,
        workers: int | str = "auto",
        flight: int = 3,
        step_norms: bool | str = "grad",
        budget: float | None = 0.05,
    ) -> None:
        _check_arguments(optimizer, model, scaler, max_dim, power_iters, config)
        _check_options(max_events, flight, step_norms, budget)
        self.optimizer = optimizer
        self.model = model
        self.every = every
        self._schedule = make_schedule(every)
        self.spectra = bool(spectra)
        self.events = bool(events)
        self.check_finite: str | bool = _check_finite_mode(check_finite)
        self.memory = bool(memory)
        self.scaler = scaler
        self.max_dim = max_dim
        self.power_iters = power_iters
        self.max_events = max_events
        self.workers, self._workers_auto = _worker_count(workers)
        self.flight = flight
        self.step_norms = step_norms
        self.budget = None if budget is None else float(budget)
        self._train_s = 0.0
        self._own_s = 0.0
        self._t0 = 0.0
        self.name = name if name is not None else type(optimizer).__name__
        self.summary: dict[str, Any] = {}

        self._make_quantities(max_dim, power_iters, max_events, flight)
        self._listeners: list[Listener] = []

        self._step = 0
        self._stepped = False
        self._cache: Recording | None = None
        self._closed = False
        self._pre_handle = (
            optimizer.register_step_pre_hook(self._pre_step)
            if hasattr(optimizer, "register_step_pre_hook")
            else None
        )
        self.meta: dict[str, Any] = self._meta(config, seed)
        self._last_end = time.perf_counter()
        self._next_recorded = self._schedule(0)
        if self._next_recorded:
            self._arm()

    def _make_quantities(
        self, max_dim: int, power_iters: int, max_events: int, flight: int
    ) -> None:
        """Build the quantities, and what the scheduler keeps for them."""
        optimizer, model = self.optimizer, self.model
        self._params = Params.of(optimizer, model)
        self._index = LayerIndex(model)
        self._group_of: dict[str, int] = {}
        for gi, g in enumerate(optimizer.param_groups):
            for t in g["params"]:
                self._group_of.setdefault(self._params.names[self._params.index[id(t)]][0], gi)
        self._tables = Tables()
        self._scalars = StepScalars(optimizer, self._params)
        self._factors = FactorSpectra(
            optimizer,
            spectra=self.spectra,
            max_dim=max_dim,
            power_iters=power_iters,
            copy=False,
            norms=ChangeCache(),
            spectra_cache=ChangeCache(),
            damping=self._damping,
            budget=self.budget,
        )
        self._use_worker = bool(self.workers) and self.spectra and self._factors.active
        self._factors.copy = self._use_worker  # the optimizer changes factors a worker reads
        self._state = OptimizerState(optimizer, self._params, self._factors.active)
        self._events = Events(self._params, self.check_finite, max_events, self._index)
        self._memory = Memory(optimizer, self._params) if self.memory else None
        self._activations = Activations()
        self._rounding = Rounding(optimizer, self._params)
        self._flight = FlightRecorder(flight if self._factors.active else 0)
        self._worker = SpectraWorker(
            self.workers if self._use_worker else 0, self._factors.compute, self._merge
        )
        self._hooks = ActivationHooks(model, self._index)
        self._guard = GuardLog(optimizer, lambda layer: self._group_number(layer, "guard"))

    def _meta(self, config: dict[str, Any] | None, seed: int | None) -> dict[str, Any]:
        """What ``recording.meta`` says about the run and the recorder."""
        opt, model, params = self.optimizer, self.model, self._params.tensors
        return {
            "name": self.name,
            "config": dict(config or {}),
            "seed": seed if seed is not None else int(torch.initial_seed()),
            "versions": _versions(),
            "optimizer": type(opt).__name__,
            "hyperparameters": [
                {k: _json_scalar(v) for k, v in g.items() if k != "params"}
                for g in opt.param_groups
            ],
            "model": type(model).__name__ if model is not None else None,
            "recorder": {
                "every": self.every if isinstance(self.every, int) else repr(self.every),
                "spectra": self.spectra,
                "events": self.events,
                "check_finite": self.check_finite,
                "memory": self.memory,
                "max_dim": self.max_dim,
                "power_iters": self.power_iters,
                "peak_rss_reset": self._memory.peak_reset if self._memory else False,
                "workers": self.workers,
                "workers_auto": self._workers_auto,
                "flight": self.flight,
                "step_norms": self.step_norms,
                "budget": self.budget,
            },
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": str(params[0].device) if params else "cpu",
        }

    # ------------------------------------------------------------------ public API
    @property
    def current_step(self) -> int:
        """Index of the next step `step` will record (steps count from 0)."""
        return self._step

    def is_recorded(self, step: int) -> bool:
        """Whether the schedule records ``step``."""
        return self._schedule(step)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(recorder, step)`` after each recorded step, and once from `close`.

        Used by live dashboards; in the call from `close`, ``recorder.closed`` is True and
        ``step`` is the last step seen (-1 when there was none).
        """
        if not callable(fn):
            raise TypeError("listener must be callable as fn(recorder, step)")
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        """Stop calling ``fn``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def log(self, step: int | None = None, **values: float) -> None:
        """Attach extra scalars (e.g. ``accuracy=0.9``) to a step (default: the last one)."""
        steps = self._tables.steps
        if not steps:
            raise ValueError("log: no step recorded yet; call recorder.step(...) first")
        idx = len(steps) - 1 if step is None else step
        if not 0 <= idx < len(steps):
            raise ValueError(f"log: step must be in [0, {len(steps) - 1}], got {step}")
        reserved = set(COLUMNS["steps"])
        for key, v in values.items():
            if key in reserved:
                raise ValueError(f"log: {key!r} is a built-in column; use another name")
            steps[idx][key] = float(v)
        self._cache = None

    def step(self, loss: torch.Tensor | float | None = None, **scalars: float) -> None:
        """Mark the end of one training step (call after ``optimizer.step()``).

        ``loss`` is the step's loss (a scalar tensor or float); extra keyword scalars
        (e.g. ``accuracy=...``) are stored as columns of ``recording.steps``.
        """
        if self._closed:
            raise RuntimeError("this Recorder is closed; create a new one")
        t0 = self._t0 = time.perf_counter()
        s = self._step
        loss_v = loss_value(loss)
        recorded = self._next_recorded
        skipped = not self._stepped if self._pre_handle is not None else False
        self._stepped = False
        row = self._scalars.row(s, loss_v, t0 - self._last_end, skipped, recorded, scalars)
        ctx = StepContext(s, row, loss_v, skipped, math.nan)
        hooked = self._hooks.take()
        trip = False
        if recorded:
            self._record(ctx, hooked)
        else:
            if self.step_norms:
                row["grad_norm"], update = self._scalars.totals(skipped)
                if self.step_norms is True or skipped:
                    row["update_norm"] = update
            if self.events:
                trip = self._check(ctx, hooked)
        if self._hooks.armed:
            self._hooks.disarm()
        self._worker.drain(wait=False)
        self._scalars.forget()
        self._tables.steps.append(row)
        self._cache = None
        self._step += 1
        self._next_recorded = self._schedule(self._step)
        if self._next_recorded or (trip and self.events):
            self._arm()
        t1 = time.perf_counter()
        row["record_time_s"] = t1 - t0
        self._train_s += row["step_time_s"]
        self._own_s += t1 - t0
        self._last_end = t1
        if recorded:
            for fn in list(self._listeners):
                fn(self, s)

    def record_error(
        self,
        exc: BaseException | str,
        *,
        phase: str = "preconditioner update",
        layer: str | None = None,
        tensor: str | None = None,
        step: int | None = None,
    ) -> None:
        """Record an error that aborts training (e.g. KFAC's inverse failure) in ``errors``.

        The row has the phase, layer and tensor (``"(model)"`` / ``"error"`` when not
        given), the exception's class name, ``message`` = ``"ExcType: message"`` and the
        step ``step`` (default: the step in progress, i.e. `current_step`), so that a run
        that gives up shows why in ``recording.errors`` and on the event timeline. The
        first error (or event) also saves the flight recorder's factor snapshots.
        """
        if isinstance(exc, BaseException):
            message = f"{type(exc).__name__}: {exc}".strip()
        elif isinstance(exc, str):
            message = exc
        else:
            raise TypeError(f"exc must be an exception or a str, got {type(exc).__name__}")
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase must be a non-empty str (e.g. one of {PHASES}), got {phase!r}")
        s = self._step if step is None else step
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
        layer = MODEL if layer is None else str(layer)
        tensor = "error" if tensor is None else str(tensor)
        exception = type(exc).__name__ if isinstance(exc, BaseException) else ""
        row = self._events.error(s, phase, layer, tensor, exception, message, self._grad_scale())
        self._tables.errors.append(row)
        with contextlib.suppress(Exception):  # a broken optimizer may not show its factors
            factors = self._factors.read()
            if not self._flight.done:
                self._flight.freeze(s, factors, self._tables)
            self._error_eig_min(s, factors)
        self._cache = None

    def _error_eig_min(self, step: int, factors: list) -> None:
        """The exact smallest eigenvalue (and damping) of each symmetric factor at an error's
        step, where that step has none: how far a factor was from losing definiteness."""
        have = {(r.layer, r.factor) for r in self._tables.metrics[-4096:] if r.step == step}
        for f in factors:
            if f.view.role != "symmetric" or (f.layer, f.name) in have:
                continue
            dense = f.view.dense().detach().to("cpu", torch.float64)
            if dense.dim() != 2 or not 0 < dense.shape[0] <= self.max_dim:
                continue
            if not bool(torch.isfinite(dense).all()):
                continue
            lam = float(torch.linalg.eigvalsh((dense + dense.T) / 2)[0])
            self._tables.metrics.append(MetricRow(step, f.layer, f.name, "eig_min", lam))
            damping = self._damping(f.layer)
            if math.isfinite(damping) and (f.layer, "(optimizer)") not in have:
                have.add((f.layer, "(optimizer)"))
                row = MetricRow(step, f.layer, "(optimizer)", "damping", damping)
                self._tables.metrics.append(row)

    @property
    def recording(self) -> Recording:
        """Everything recorded so far as a `Recording` (built on demand, cached)."""
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def flush(self) -> int:
        """Wait for the worker's pending spectra and merge them; returns how many jobs were
        still running (0 without a worker). `recording` and `close` do this themselves."""
        running = self._worker.in_flight()
        self._worker.drain(wait=True)
        return running

    def close(self) -> None:
        """Remove all hooks (idempotent); the recording stays readable."""
        self._hooks.disarm()
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        self._worker.close()
        if not self._closed:
            self._closed = True
            for fn in list(self._listeners):
                fn(self, self._step - 1)

    @property
    def closed(self) -> bool:
        """Whether `close` ran (hooks removed; `step` refuses)."""
        return self._closed

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ scheduling
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: note that a step happens; snapshot params if recorded."""
        self._stepped = True
        if self._next_recorded or self.step_norms is True:
            self._scalars.snapshot()

    def _arm(self) -> None:
        """Install the hooks for the next step (events only)."""
        if self.events:
            self._hooks.arm()

    def _available(self) -> float | None:
        """Seconds the budget leaves for this step's decompositions (None: no budget)."""
        if self.budget is None:
            return None
        own = self._own_s + (time.perf_counter() - self._t0)
        if self._use_worker:
            own += self._factors.spent
        return self.budget * self._train_s - own

    def _damping(self, layer: str) -> float:
        """The damping of the parameter group that holds ``layer``'s parameters (NaN: none)."""
        return self._group_number(layer, "damping")

    def _group_number(self, layer: str, key: str) -> float:
        """``key`` of the parameter group that holds ``layer``'s parameters (NaN: none)."""
        gi = self._group_of.get(layer)
        d = self.optimizer.param_groups[gi].get(key) if gi is not None else None
        return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else math.nan

    def _grad_scale(self) -> float:
        """Current GradScaler scale (NaN without an enabled scaler)."""
        sc = self.scaler
        if sc is None or (hasattr(sc, "is_enabled") and not sc.is_enabled()):
            return math.nan
        return float(sc.get_scale())

    def _check(self, ctx: StepContext, hooked: list[Hooked]) -> bool:
        """An unrecorded step: the cheap check, and a full inspection when it trips (or
        when hooks saw something, or the step was skipped); whether it tripped."""
        findings = self._hooks.findings(hooked) if hooked else []
        ok = self._events.cheap_check(ctx.loss) if self.check_finite else True
        if ok and not findings and not ctx.skipped:
            return False
        ctx.grad_scale = ctx.row["grad_scale"] = self._grad_scale()
        with torch.no_grad():
            factors = self._factors.read()
            probes = (
                self._events.loss_probes(ctx.loss)
                + self._scalars.probes()
                + self._factors.probes(factors)
                + self._state.probes(self._state.items())
            )
            norms = fused_norms([p.tensor for p in probes])
        before = len(self._tables.events)
        self._events.inspect(ctx, probes, norms, findings, self._tables)
        if len(self._tables.events) > before:
            self._flight.freeze(ctx.step, factors, self._tables)
        return not ok

    @torch.no_grad()
    def _record(self, ctx: StepContext, hooked: list[Hooked]) -> None:
        """Everything a recorded step measures: each quantity's probes go through one
        fused norm pass (one host read), then each quantity makes its rows."""
        ctx.grad_scale = ctx.row["grad_scale"] = self._grad_scale()
        factors = self._factors.read()
        state_items = self._state.items()
        groups = {
            "loss": self._events.loss_probes(ctx.loss),
            "scalars": self._scalars.probes(parameters=self.events),
            "factors": self._factors.probes(factors, cached=True),
            "state": self._state.probes(state_items) if self.events else [],
        }
        probes = [p for group in groups.values() for p in group]
        lazy = self._hooks.lazy(hooked) if hooked else []
        updates = self._scalars.update_tensors()
        fresh = [p.tensor for p in probes if p.norm is None]
        computed = fused_norms(fresh + [it.tensor for it in lazy] + updates)
        rest = iter(computed[: len(fresh)])
        norms = [next(rest) if p.norm is None else p.norm for p in probes]
        hooked_norms = computed[len(fresh) : len(fresh) + len(lazy)]
        update_norms = computed[len(fresh) + len(lazy) :]
        by_group: dict[str, list[float]] = {}
        k = 0
        for key, group in groups.items():
            by_group[key] = norms[k : k + len(group)]
            k += len(group)

        s, tables = ctx.step, self._tables
        self._guard.record(tables)  # first: its rows have steps up to s
        self._activations.record(s, lazy, hooked_norms, tables)
        if self.events:
            findings = self._hooks.findings(hooked, hooked_norms) if hooked else []
            before = len(tables.events)
            self._events.inspect(ctx, probes, norms, findings, tables)
            if len(tables.events) > before:
                self._flight.freeze(s, factors, tables)
        self._flight.keep(s, factors)
        self._state.record_norms(s, groups["state"], by_group["state"], tables)
        self._scalars.record(ctx, groups["scalars"], by_group["scalars"], update_norms, tables)
        self._rounding.record(s, updates, tables)
        job = (
            self._factors.record(s, factors, by_group["factors"], tables, self._available())
            if factors
            else None
        )
        if job is not None and self.budget is not None:
            plans = [it.plan for it in job.items]
            ctx.row["spectra_exact"] = float(plans.count("decompose"))
            ctx.row["spectra_estimated"] = float(plans.count("estimate"))
        if self.spectra:
            self._state.record_moments(s, state_items, tables)
        if self._memory is not None:
            self._memory.record(s, tables)
        if job is not None:  # last: a worker started earlier slows the reads above
            self._worker.submit(job, job.decomposes)

    def _merge(self, job: SpectraJob, results: list) -> None:
        """Add a finished spectra job's rows (training thread, in step order)."""
        self._factors.merge(job, results, self._tables)
        self._cache = None

    # ------------------------------------------------------------------ building
    def _build(self) -> Recording:
        """Turn the collected rows into a `Recording` (waits for pending spectra)."""
        self._worker.drain(wait=True)
        t = self._tables
        self._guard.record(t)  # activations after the last recorded step
        for r in t.steps:
            for key in ("loss", "grad_norm", "update_norm"):
                if isinstance(r.get(key), torch.Tensor):
                    r[key] = float(r[key])
        metrics = frame_from_rows("metrics", _columns(t.metrics, COLUMNS["metrics"]))
        if self._use_worker:  # spectra jobs finish after later steps' rows: restore step order
            metrics = metrics.sort_values("step", kind="stable", ignore_index=True)
        return Recording(
            name=self.name,
            steps=frame_from_rows("steps", t.steps),
            metrics=metrics,
            spectra=_spectra_frame(t.spectra),
            events=frame_from_rows("events", t.events),
            memory=frame_from_rows("memory", _columns(t.memory, COLUMNS["memory"])),
            meta=self._meta_now(),
            summary=self.summary,
            errors=frame_from_rows("errors", t.errors),
            snapshots=list(t.snapshots),
        )

    def _meta_now(self) -> dict[str, Any]:
        """``meta`` with ``meta["layers"]``: every layer with parameters in forward order."""
        meta = dict(self.meta)
        names = [layer for layer, _ in self._params.names] + list(self._index.seen)
        meta["layers"] = self._index.table(names)
        return meta


def _columns(rows: list[tuple], names: Iterable[str]) -> dict[str, list]:
    """Named-tuple rows as column lists (the tuples' fields are the frame's columns)."""
    names = list(names)
    if not rows:
        return {n: [] for n in names}
    return {n: list(col) for n, col in zip(names, zip(*rows))}


def _spectra_frame(blocks: list) -> Any:
    """The ``spectra`` frame: one row per eigenvalue, blocks in step order."""
    blocks = sorted(blocks, key=lambda b: b.step)  # stable: factor order kept
    sizes = [b.eigenvalues.size for b in blocks]
    return frame_from_rows(
        "spectra",
        {
            "step": np.repeat(np.array([b.step for b in blocks], dtype=np.int64), sizes),
            "layer": np.repeat(np.array([b.layer for b in blocks], dtype=object), sizes),
            "factor": np.repeat(np.array([b.factor for b in blocks], dtype=object), sizes),
            "index": np.concatenate([np.arange(n) for n in sizes] or [np.zeros(0, int)]),
            "value": np.concatenate([b.eigenvalues for b in blocks] or [np.zeros(0)]),
        },
    )
