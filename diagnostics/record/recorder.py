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
  with one host read; a factor whose stored tensors are unchanged since the last recorded
  step (same objects, same version counters) keeps its norms.
- **spectra** (``spectra=True``, recorded steps): read structure-aware through
  `metrics.spectral_parts` (diagonal factors: their entries, no decomposition;
  block-diagonal: per block; others dense) and batched by `metrics.parts_spectra` (all
  square blocks of one size, across layers, in one product and one ``eigvalsh``; float32
  first for float32 and 16-bit factors, float64 again for a factor whose float32
  condition number exceeds `metrics.FLOAT32_MAX_COND` = 1e4, see `diagnostics.record.metrics`).
  A factor unchanged since its last decomposition (same objects, same version counters;
  SINGD changes K and C only every T steps) is not decomposed again: its spectrum is
  recorded again for the new step. On the digits MLP (six dense factors of size 10 to
  129) a decomposition costs about 1.7 ms on one CPU core, more than a SINGD step
  (1.3 ms). With ``workers="auto"`` (default) it runs on a worker thread when this
  process may use more CPUs than torch's intra-op threads
  (``len(os.sched_getaffinity(0)) > torch.get_num_threads()``, see `auto_workers`);
  the training thread then only copies the factors to decompose. The worker only
  helps when that CPU is really idle: on a machine whose other cores are busy it
  competes with the training thread for a core (see ``benchmarks/RESULTS.md``,
  "Recorder overhead").
- a tripped finiteness check on an unrecorded step gets the same detailed inspection of
  loss, gradients, parameters, factors and state (phases ``forward``, ``backward``,
  ``preconditioner update``, ``parameter update``), and arms the hooks for the next step so
  that the forward/backward origin is caught there.

Optimizer state is read through the public view only: ``preconditioner_factors()`` and
``state_bytes()`` when present (SINGD, KFAC); otherwise ``optimizer.state`` (the public
``torch.optim`` state, e.g. AdamW's ``exp_avg``/``exp_avg_sq``). Everything is read-only:
norms and counts are reductions over the tensors (16-bit ones accumulated in float32),
spectra are computed on upcast copies (float32 or float64, never in place); training
numbers are never modified, and the hooks return nothing (they never replace an
activation or a gradient). In-place changes made through ``.data`` do not move a tensor's
version counter: an optimizer that changes its factors that way would have them taken as
unchanged (SINGD and KFAC replace or update them through ordinary tensor operations).

Memory: hooked activations and output gradients of a recorded step are referenced until
`step` (the activations are kept by autograd anyway; the output gradients add about one
activation's worth). Hooks are added and removed per recorded step, which makes a
``torch.compile``d model see two hook configurations (two compiled variants).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from diagnostics.record import metrics as M
from diagnostics.record.recording import COLUMNS, PHASES, Recording, frame_from_rows

Schedule = int | Iterable[int] | Callable[[int], bool]
Listener = Callable[["Recorder", int], None]

_LOW = (torch.float16, torch.bfloat16)
_SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf")
PROCESS = "(process)"
MODEL = "(model)"


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


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Floating-point tensors in a module's inputs or outputs (tuples/lists/dicts, one level)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for t in obj if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if isinstance(obj, dict):
        return [t for t in obj.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return []


def _norms(tensors: list[torch.Tensor], ord: float = 2) -> list[float]:
    """``ord``-norms as Python floats (16-bit tensors reduced in float32), one host sync.

    A norm is non-finite exactly when the tensor holds NaN/Inf, or when the norm itself
    overflows (then a later detailed count finds nothing and no event is made).
    """
    if not tensors:
        return []
    low = [i for i, t in enumerate(tensors) if t.dtype in _LOW]
    high = [i for i, t in enumerate(tensors) if t.dtype not in _LOW]
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


def auto_workers() -> int:
    """What ``workers="auto"`` means here: 1 when this process may run on more CPUs than
    torch's intra-op threads use (``len(os.sched_getaffinity(0)) > torch.get_num_threads()``,
    ``os.cpu_count()`` where affinity is unknown), else 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - systems other than Linux
        cpus = os.cpu_count() or 1
    return 1 if cpus > torch.get_num_threads() else 0


def _stamp(matrix: object, parts: list[torch.Tensor]) -> tuple | None:
    """What identifies a factor's current values: its object (weakly), and its stored
    tensors' data pointers and version counters (None when it cannot be referenced weakly)."""
    try:
        ref = weakref.ref(matrix)
    except TypeError:
        return None
    return (ref, tuple((p.data_ptr(), p._version, p.shape) for p in parts))


def _same_stamp(old: tuple, matrix: object, new: tuple) -> bool:
    """Whether a factor is unchanged since ``old`` was taken (same live object, same versions)."""
    return old[0]() is matrix and old[1] == new[1]


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
    ) -> None:
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
        self.optimizer = optimizer
        self.model = model
        self.every = every
        self._schedule = make_schedule(every)
        self.spectra = bool(spectra)
        self.events = bool(events)
        if check_finite is True:
            check_finite = "grads"
        if check_finite not in (False, None, "grads", "loss"):
            raise ValueError(
                f"check_finite must be 'grads' (or True), 'loss' or False, got {check_finite!r}"
            )
        self.check_finite: str | bool = check_finite or False
        self.memory = bool(memory)
        self.scaler = scaler
        self.max_dim = max_dim
        self.power_iters = power_iters
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
            raise ValueError(f"max_events must be an int >= 0, got {max_events!r}")
        self.max_events = max_events
        if workers == "auto":
            workers = auto_workers()
            self._workers_auto = True
        elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be 'auto' or an int >= 0, got {workers!r}")
        else:
            self._workers_auto = False
        self.workers: int = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self.name = name if name is not None else type(optimizer).__name__

        # names: param -> (layer, short name)
        self._params: list[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        names: dict[int, tuple[str, str]] = {}
        self._hook_modules: list[tuple[str, nn.Module]] = []
        if model is not None:
            for mod_name, mod in model.named_modules():
                own = list(mod.parameters(recurse=False))
                if own:
                    self._hook_modules.append((mod_name or MODEL, mod))
                for pname, p in mod.named_parameters(recurse=False):
                    names.setdefault(id(p), (mod_name or MODEL, pname))
        self._names = [names.get(id(p), (f"param{i}", "param")) for i, p in enumerate(self._params)]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._grad_names = [short + ".grad" for _, short in self._names]
        self._cpu = all(p.device.type == "cpu" for p in self._params)
        self._sizes = [p.numel() for p in self._params]
        self._flat = (
            bool(self._params)
            and len({(p.device, p.dtype) for p in self._params}) == 1
            and sum(self._sizes) <= 1 << 22  # small models: per-tensor op overhead dominates
        )
        self._has_factors = callable(getattr(optimizer, "preconditioner_factors", None))
        self._use_worker = bool(self.workers) and self.spectra and self._has_factors
        self._has_state_bytes = callable(getattr(optimizer, "state_bytes", None))

        self._step = 0
        self._steps: list[dict[str, Any]] = []
        self._metrics: list[tuple] = []
        self._spec_blocks: list[tuple[int, str, str, np.ndarray]] = []  # (step, layer, factor, eig)
        self._fkeys: dict[tuple[str, str], tuple] = {}  # factor -> stamp at its last decomposition
        self._nkeys: dict[tuple[str, str], tuple] = {}  # factor -> (stamp, norms of its tensors)
        self._flast: dict[tuple[str, str], tuple[np.ndarray, bool]] = {}  # its last spectrum
        self._events: list[dict[str, Any]] = []
        self._memory: list[tuple] = []
        self._listeners: list[Listener] = []
        self._hook_handles: list[Any] = []
        self._hook_items: list[tuple] = []
        self._eager: set[tuple[str, str]] = set()
        self._armed = False
        self._stepped = False
        self._before: list[torch.Tensor] | None = None
        self._cache: Recording | None = None
        self._closed = False
        self._warned_events = False
        self.summary: dict[str, Any] = {}

        self._peak_reset = M.reset_peak_rss() if memory else False
        if memory:
            M.cuda_peak_bytes(reset=True)
        self._pre_handle = (
            optimizer.register_step_pre_hook(self._pre_step)
            if hasattr(optimizer, "register_step_pre_hook")
            else None
        )
        self.meta: dict[str, Any] = {
            "name": self.name,
            "config": dict(config or {}),
            "seed": seed if seed is not None else int(torch.initial_seed()),
            "versions": _versions(),
            "optimizer": type(optimizer).__name__,
            "hyperparameters": [
                {k: _json_scalar(v) for k, v in g.items() if k != "params"}
                for g in optimizer.param_groups
            ],
            "model": type(model).__name__ if model is not None else None,
            "recorder": {
                "every": every if isinstance(every, int) else repr(every),
                "spectra": self.spectra,
                "events": self.events,
                "check_finite": self.check_finite,
                "memory": self.memory,
                "max_dim": max_dim,
                "power_iters": power_iters,
                "peak_rss_reset": self._peak_reset,
                "workers": self.workers,
                "workers_auto": self._workers_auto,
            },
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": str(self._params[0].device) if self._params else "cpu",
        }
        self._last_end = time.perf_counter()
        self._next_recorded = self._schedule(0)
        if self._next_recorded:
            self._arm()

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
        if not self._steps:
            raise ValueError("log: no step recorded yet; call recorder.step(...) first")
        idx = len(self._steps) - 1 if step is None else step
        if not 0 <= idx < len(self._steps):
            raise ValueError(f"log: step must be in [0, {len(self._steps) - 1}], got {step}")
        reserved = set(COLUMNS["steps"])
        for key, v in values.items():
            if key in reserved:
                raise ValueError(f"log: {key!r} is a built-in column; use another name")
            self._steps[idx][key] = float(v)
        self._cache = None

    def step(self, loss: torch.Tensor | float | None = None, **scalars: float) -> None:
        """Mark the end of one training step (call after ``optimizer.step()``).

        ``loss`` is the step's loss (a scalar tensor or float); extra keyword scalars
        (e.g. ``accuracy=...``) are stored as columns of ``recording.steps``.
        """
        if self._closed:
            raise RuntimeError("this Recorder is closed; create a new one")
        t0 = time.perf_counter()
        s = self._step
        if isinstance(loss, torch.Tensor):
            if loss.is_cpu:  # on the CPU a float costs nothing
                try:
                    loss_v: Any = loss.item()
                except RuntimeError:
                    loss_v = None
                    if loss.numel() == 1:
                        raise
            else:  # elsewhere keep the tensor (no host sync)
                loss_v = loss.detach() if loss.numel() == 1 else None
            if loss_v is None:
                raise ValueError(
                    f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                )
        elif loss is None:  # no loss given: NaN in the frame, but not a NaN event
            loss_v = None
        elif isinstance(loss, (int, float)):
            loss_v = float(loss)
        else:
            raise TypeError(f"loss must be a scalar tensor, a float or None, not {type(loss)}")
        recorded = self._next_recorded
        skipped = not self._stepped if self._pre_handle is not None else False
        self._stepped = False
        row: dict[str, Any] = {
            "step": s,
            "recorded": recorded,
            "loss": loss_v,
            "lr": float(self.optimizer.param_groups[0].get("lr", math.nan)),
            "step_time_s": t0 - self._last_end,
            "skipped": skipped,
        }
        for key, v in scalars.items():
            if key in COLUMNS["steps"]:
                raise ValueError(f"step: {key!r} is a built-in column; use another name")
            row[key] = float(v)
        trip = False
        hook_items, self._hook_items = self._hook_items, []
        if recorded:
            self._record(s, row, loss_v, skipped, hook_items)
        elif self.events:
            hooked = self._resolve_hooked(hook_items) if hook_items else []
            ok = self._cheap_check(loss_v) if self.check_finite else True
            if not ok or hooked or skipped:
                grad_scale = self._grad_scale()
                row["grad_scale"] = grad_scale
                self._inspect(s, loss_v, hooked, skipped, grad_scale)
                trip = not ok
        if self._armed:
            self._disarm()
        if self._pending:
            self._drain(wait=False)
        self._before = None
        self._steps.append(row)
        self._cache = None
        self._step += 1
        self._next_recorded = self._schedule(self._step)
        if self._next_recorded or (trip and self.events):
            self._arm()
        t1 = time.perf_counter()
        row["record_time_s"] = t1 - t0
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
        """Record an error that aborts training (e.g. KFAC's inverse failure) as an event row.

        The row has the phase, layer and tensor (``"(model)"`` / ``"error"`` when not
        given), ``message`` = ``"ExcType: message"``, zero NaN/Inf counts, and the step
        ``step`` (default: the step in progress, i.e. `current_step`), so that a run that
        gives up shows why in ``recording.events`` and on the event timeline. It counts
        towards ``max_events`` only in that it is always kept.
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
        self._events.append(
            {
                "step": s,
                "phase": phase,
                "layer": MODEL if layer is None else str(layer),
                "tensor": "error" if tensor is None else str(tensor),
                "dtype": "",
                "shape": "",
                "numel": 0,
                "n_nan": 0,
                "n_posinf": 0,
                "n_neginf": 0,
                "finite_absmax": math.nan,
                "grad_scale": self._grad_scale(),
                "skipped": True,
                "message": message,
            }
        )
        self._cache = None

    @property
    def recording(self) -> Recording:
        """Everything recorded so far as a `Recording` (built on demand, cached)."""
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def flush(self) -> int:
        """Wait for the worker's pending spectra and merge them; returns how many jobs were
        still running (0 without a worker). `recording` and `close` do this themselves."""
        running = sum(not fut.done() for _, _, fut in self._pending)
        self._drain(wait=True)
        return running

    def close(self) -> None:
        """Remove all hooks (idempotent); the recording stays readable."""
        self._disarm()
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        self._drain(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
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

    # ------------------------------------------------------------------ hooks
    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: note that a step happens; snapshot params if recorded."""
        self._stepped = True
        if self._next_recorded:
            with torch.no_grad():
                if self._flat:  # one copy of all parameters instead of one per tensor
                    self._before = [torch.cat([p.detach().reshape(-1) for p in self._params])]
                else:
                    self._before = [p.detach().clone() for p in self._params]

    def _arm(self) -> None:
        """Install forward hooks (activations) and output-gradient hooks for one step."""
        if self._armed or not self.events or not self._hook_modules:
            return
        for name, mod in self._hook_modules:
            self._hook_handles.append(mod.register_forward_hook(self._make_forward_hook(name)))
        self._armed = True

    def _disarm(self) -> None:
        """Remove the per-step hooks."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
        self._armed = False

    def _make_forward_hook(self, name: str):
        items = self

        def grad_hook(tensor_name: str):
            def hook(g: torch.Tensor) -> None:
                items._check_hooked("backward", name, tensor_name, g)

            return hook

        def forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not torch.is_grad_enabled():  # evaluation passes are not training steps
                return
            ins = _tensors(inputs)
            for i, t in enumerate(ins):
                items._check_hooked("forward", name, "input" if i == 0 else f"input{i}", t)
            outs = _tensors(output)
            for i, t in enumerate(outs):
                tname = "output" if i == 0 else f"output{i}"
                items._check_hooked("forward", name, tname, t)
                if t.requires_grad:
                    t.register_hook(grad_hook("grad_" + tname))

        return forward_hook

    def _check_hooked(self, phase: str, layer: str, tensor: str, t: torch.Tensor) -> None:
        """Note one hooked tensor; it is checked at `step`, in one batch with the others.

        The tensor's version counter is kept: if it is modified in place before `step`
        (e.g. by ``ReLU(inplace=True)``), the values seen then are not the ones the hook
        saw, so that (layer, tensor) is checked eagerly in the hook from then on.
        """
        t = t.detach()
        if (layer, tensor) not in self._eager:
            self._hook_items.append((phase, layer, tensor, t, t._version, None))
            return
        norm = torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in _LOW else None)
        if not math.isfinite(norm.item()):
            self._hook_items.append((phase, layer, tensor, t, t._version, M.count_vector(t)))

    def _resolve_hooked(self, items: list[tuple], norms: list[float] | None = None) -> list[tuple]:
        """The hooked tensors that held NaN/Inf: (phase, layer, tensor, t, count vector).

        ``norms``: the norms of ``_lazy_hooked(items)``'s tensors when already computed.
        """
        found = [(ph, ly, tn, t, cv) for ph, ly, tn, t, _, cv in items if cv is not None]
        lazy = self._lazy_hooked(items)
        if norms is None:
            norms = _norms([it[3] for it in lazy])
        for (ph, ly, tn, t, _, _), n in zip(lazy, norms):
            if not math.isfinite(n):
                found.append((ph, ly, tn, t, M.count_vector(t)))
        return found

    def _lazy_hooked(self, items: list[tuple]) -> list[tuple]:
        """Hooked items still to be checked at `step` (noting those changed in place since)."""
        lazy = [it for it in items if it[5] is None]
        for _, ly, tn, t, version, _ in lazy:
            if t._version != version:  # changed in place after the hook: check eagerly later
                self._eager.add((ly, tn))
        return lazy

    # ------------------------------------------------------------------ measurement
    def _grad_scale(self) -> float:
        """Current GradScaler scale (NaN without an enabled scaler)."""
        sc = self.scaler
        if sc is None or (hasattr(sc, "is_enabled") and not sc.is_enabled()):
            return math.nan
        return float(sc.get_scale())

    def _cheap_check(self, loss_v: Any) -> bool:
        """Finiteness of the loss (and, for ``"grads"``, all gradients): one host sync."""
        if self.check_finite == "grads":
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                if self._cpu:
                    total = sum(float(n) for n in norms)
                else:
                    total = torch.stack([n.float() for n in norms]).sum()
                    if isinstance(loss_v, torch.Tensor):
                        total = total + loss_v.float()
                        return bool(torch.isfinite(total))
                    total = float(total)
                if not math.isfinite(total):
                    return False
        return loss_v is None or math.isfinite(float(loss_v))

    def _state_items(self) -> list[tuple[str, str, str, torch.Tensor, float]]:
        """(layer, short, key, tensor, eps) of generic optimizer state (optimizers w/o factors)."""
        out = []
        if self._has_factors:
            return out
        state = self.optimizer.state
        for group in self.optimizer.param_groups:
            eps = group.get("eps", 0.0)
            eps = float(eps) if isinstance(eps, (int, float)) else 0.0
            for p in group["params"]:
                st = state.get(p)
                if not st:
                    continue
                layer, short = self._names[self._index[id(p)]]
                for key, v in st.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.is_floating_point():
                        out.append((layer, short, str(key), v, eps))
        return out

    def _factors(self) -> list[tuple[str, str, Any, list[torch.Tensor], str]]:
        """(layer, factor, view, stored tensors, kind) from ``preconditioner_factors()``.

        The tensors come from `metrics.spectral_parts` (no dense copy for dense, diagonal
        and block-diagonal structures); they may be the optimizer's storage and are only
        read. Empty for optimizers without the view.
        """
        if not self._has_factors:
            return []
        out = []
        for layer, lf in self.optimizer.preconditioner_factors().items():
            for fname, view in lf.factors.items():
                kind, parts = M.spectral_parts(view.matrix, view.role, view.structure)
                out.append((str(layer), str(fname), view, parts, kind))
        return out

    def _inspect(
        self,
        step: int,
        loss_v: Any,
        hooked: list[tuple],
        skipped: bool,
        grad_scale: float,
        candidates: list[tuple[str, str, str, torch.Tensor]] | None = None,
        norms: list[float] | None = None,
    ) -> None:
        """Find NaN/Inf in hooked tensors, loss, grads, params, factors, state; add events."""
        if candidates is None:
            with torch.no_grad():
                candidates = self._candidates(loss_v, self._factors())
                norms = _norms([c[3] for c in candidates])
        found: list[tuple[str, str, str, torch.Tensor, torch.Tensor]] = []
        for (phase, layer, tname, t), n in zip(candidates, norms):
            if not math.isfinite(n):
                found.append((phase, layer, tname, t, M.count_vector(t)))
        found.extend(hooked)
        if not found:
            return
        counts = torch.stack([f[4].to("cpu") for f in found]).tolist()
        merged: dict[tuple[str, str, str], dict[str, Any]] = {}
        for (phase, layer, tname, t, _), (nan, pos, neg, absmax) in zip(found, counts):
            if nan + pos + neg == 0:
                continue  # a norm overflowed, the tensor itself is finite
            key = (phase, layer, tname)
            ev = merged.get(key)
            if ev is None:
                merged[key] = {
                    "step": step,
                    "phase": phase,
                    "layer": layer,
                    "tensor": tname,
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": str(tuple(t.shape)),
                    "numel": t.numel(),
                    "n_nan": int(nan),
                    "n_posinf": int(pos),
                    "n_neginf": int(neg),
                    "finite_absmax": float(absmax),
                    "grad_scale": grad_scale,
                    "skipped": skipped,
                }
            else:
                ev["n_nan"] += int(nan)
                ev["n_posinf"] += int(pos)
                ev["n_neginf"] += int(neg)
                ev["numel"] += t.numel()
                ev["finite_absmax"] = max(ev["finite_absmax"], float(absmax))
        room = self.max_events - len(self._events)
        new = list(merged.values())
        if len(new) > room:
            if not self._warned_events:
                import warnings

                warnings.warn(
                    f"Recorder: more than max_events={self.max_events} NaN/Inf events; "
                    "further events are dropped",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_events = True
            new = new[: max(room, 0)]
        self._events.extend(new)

    def _candidates(
        self,
        loss_v: Any,
        factors: list[tuple[str, str, Any, list[torch.Tensor], str]],
        *,
        full: bool = True,
        state: bool | list[tuple] = True,
    ) -> list[tuple[str, str, str, torch.Tensor]]:
        """Tensors looked at (for events and norms), each with its phase, layer and name.

        Always the loss, gradients and the given factors; with ``full`` also parameters;
        with ``state`` (True, or the items of `_state_items` already listed) the generic
        optimizer state (optimizers without factors).
        """
        out: list[tuple[str, str, str, torch.Tensor]] = []
        if isinstance(loss_v, torch.Tensor):
            out.append(("forward", MODEL, "loss", loss_v))
        elif loss_v is not None and not math.isfinite(loss_v):
            out.append(("forward", MODEL, "loss", torch.tensor(loss_v, dtype=torch.float64)))
        for p, (layer, _), gname in zip(self._params, self._names, self._grad_names):
            g = p.grad
            if g is not None and g.is_floating_point():
                out.append(("backward", layer, gname, g))
        if full:
            for p, (layer, short) in zip(self._params, self._names):
                if p.is_floating_point():
                    out.append(("parameter update", layer, short, p))
        for layer, fname, _, parts, _ in factors:
            for t in parts:  # several stored tensors of one factor merge into one event
                out.append(("preconditioner update", layer, fname, t))
        items = self._state_items() if state is True else (state or [])
        for layer, short, key, t, _ in items:
            out.append(("preconditioner update", layer, f"{short}.{key}", t))
        return out

    @torch.no_grad()
    def _record(
        self, s: int, row: dict[str, Any], loss_v: Any, skipped: bool, hook_items: list[tuple]
    ) -> None:
        """Everything a recorded step measures (all norms in one fused call, one read)."""
        grad_scale = self._grad_scale()
        row["grad_scale"] = grad_scale
        factors = self._factors()
        state_items = self._state_items()
        cands = self._candidates(
            loss_v, factors, full=self.events, state=state_items if self.events else []
        )
        lazy = self._lazy_hooked(hook_items) if hook_items else []
        # factors unchanged since the last recorded step keep their norms (no state with them)
        nf = sum(len(f[3]) for f in factors)
        fstart = len(cands) - nf
        stamps: dict[tuple[str, str], tuple | None] = {}
        known: dict[int, float] = {}
        k = fstart
        for layer, fname, view, parts, _ in factors:
            stamp = stamps[(layer, fname)] = _stamp(view.matrix, parts)
            old = self._nkeys.get((layer, fname))
            if old is not None and stamp is not None and _same_stamp(old[0], view.matrix, stamp):
                known.update(zip(range(k, k + len(parts)), old[1]))
            k += len(parts)
        before = self._before
        n_upd = 0
        tensors = [c[3] for i, c in enumerate(cands) if i not in known]
        n_fresh = len(tensors)
        tensors.extend(it[3] for it in lazy)
        if before is not None and len(before) == 1 and self._flat:
            after = torch.cat([p.detach().reshape(-1) for p in self._params])
            diffs = before[0].sub_(after).split(self._sizes)  # -update, one view per param
            tensors.extend(diffs)
            n_upd = len(diffs)
        elif before is not None and len(before) == len(self._params):
            torch._foreach_sub_(before, self._params)  # before <- before - after = -update
            tensors.extend(before)
            n_upd = len(before)
        all_norms = _norms(tensors)
        nc, nh = n_fresh, len(lazy)
        if known:
            fresh = iter(all_norms[:nc])
            norms = [known[i] if i in known else next(fresh) for i in range(len(cands))]
        else:
            norms = all_norms[:nc]
        k = fstart
        for layer, fname, _, parts, _ in factors:
            stamp = stamps[(layer, fname)]
            if stamp is None:
                self._nkeys.pop((layer, fname), None)
            else:
                self._nkeys[(layer, fname)] = (stamp, norms[k : k + len(parts)])
            k += len(parts)
        upd_norms = all_norms[nc + nh :] if n_upd else []
        if self.events:
            hooked = self._resolve_hooked(hook_items, all_norms[nc : nc + nh]) if hook_items else []
            self._inspect(s, loss_v, hooked, skipped, grad_scale, cands, norms)
        mrows = self._metrics
        # per-layer and total norms of gradients, parameters, updates; optimizer state norms
        sq: dict[str, dict[str, float]] = {"grad": {}, "param": {}, "update": {}}
        fsq: dict[tuple[str, str], float] = {}
        for (phase, layer, tname, _), n in zip(cands, norms):
            if phase == "backward":
                d = sq["grad"]
            elif phase == "parameter update":
                d = sq["param"]
            else:
                if phase == "preconditioner update":
                    if "." in tname:
                        mrows.append((s, layer, tname, "norm", n))
                    else:  # a factor's stored tensor
                        fsq[(layer, tname)] = fsq.get((layer, tname), 0.0) + n * n
                continue
            d[layer] = d.get(layer, 0.0) + n * n
        for (layer, _), n in zip(self._names, upd_norms):
            sq["update"][layer] = sq["update"].get(layer, 0.0) + n * n
        for kind, d in sq.items():
            for layer, v in d.items():
                mrows.append((s, layer, kind, "norm", math.sqrt(v)))
        g2, p2, u2 = sq["grad"], sq["param"], sq["update"]
        row["grad_norm"] = math.sqrt(sum(g2.values())) if g2 else math.nan
        row["param_norm"] = math.sqrt(sum(p2.values())) if p2 else math.nan
        row["update_norm"] = math.sqrt(sum(u2.values())) if u2 else (0.0 if skipped else math.nan)
        for i, g in enumerate(self.optimizer.param_groups):
            if "lr" in g:
                mrows.append((s, f"group{i}", "optimizer", "lr", float(g["lr"])))
        jobs = self._record_factors(s, factors, fsq, stamps) if factors else None
        # generic optimizer state (AdamW & co): second-moment statistics
        if self.spectra:
            moments = [it for it in state_items if it[2] in _SECOND_MOMENT_KEYS]
            summaries = M.second_moment_summaries([(it[3], it[4]) for it in moments])
            for (layer, short, key, _, _), summ in zip(moments, summaries):
                for metric, v in summ.items():
                    mrows.append((s, layer, f"{short}.{key}", metric, v))
        if self.memory:
            self._record_memory(s)
        if jobs:  # last: a worker started earlier slows the reads above (memory locks, caches)
            self._start_factor_job(s, jobs)

    def _record_factors(
        self,
        s: int,
        factors: list[tuple[str, str, Any, list[torch.Tensor], str]],
        fsq: dict[tuple[str, str], float],
        stamps: dict[tuple[str, str], tuple | None],
    ) -> list[tuple] | None:
        """Factor metrics: norms and traces from the fused norms; the spectra job to start.

        A factor whose stored tensors are the same objects with the same version counters
        as at its last decomposition is not decomposed again: its previous spectrum is
        recorded for this step too (``optimizer.step()`` changes SINGD's factors only
        every T steps).
        """
        mrows = self._metrics
        nan = math.nan
        sym = []
        jobs: list[tuple] = []  # (layer, factor, role, payload) in factor order
        moments = []
        for layer, fname, view, parts, kind in factors:
            sq_ = fsq.get((layer, fname), 0.0)
            finite = math.isfinite(sq_)
            mrows.append((s, layer, fname, "norm_fro", math.sqrt(sq_) if finite else nan))
            role = view.role
            if role == "root":
                mrows.append((s, layer, fname, "trace", sq_ if finite else nan))
            elif role == "symmetric":
                sym.append((layer, fname, parts, kind, finite))
            if not self.spectra:
                continue
            if role == "momentum":
                moments.append((layer, fname, parts, finite))
                continue
            key = (layer, fname)
            dim = view.dim
            if not finite or dim == 0:
                self._fkeys.pop(key, None)
                jobs.append((layer, fname, role, None))
                continue
            stamp = stamps[key]
            old = self._fkeys.get(key)
            if old is not None and stamp is not None and _same_stamp(old, view.matrix, stamp):
                jobs.append((layer, fname, role, "reuse"))
                continue
            if stamp is not None:
                self._fkeys[key] = stamp
            else:
                self._fkeys.pop(key, None)
            if self._use_worker:  # the optimizer changes its factors while a worker reads
                parts = [p.clone() for p in parts]
            jobs.append((layer, fname, role, (role, kind, parts, dim)))
        if sym:  # KFAC: traces, one host sync
            traces = torch.stack(
                [sum(M._diag_sum(p.double(), kind) for p in parts) for _, _, parts, kind, _ in sym]
            ).tolist()
            for (layer, fname, _, _, finite), tr in zip(sym, traces):
                mrows.append((s, layer, fname, "trace", float(tr) if finite else nan))
        if moments:  # largest magnitude of each momentum (aminmax: 10x faster than inf-norm)
            mparts = [p for _, _, parts, _ in moments for p in parts if p.numel()]
            if not mparts:
                ext = iter([])
            elif self._cpu:  # no sync to save: floats straight away (half the time)
                ext = iter([max(-float(lo), float(hi)) for lo, hi in map(torch.aminmax, mparts)])
            else:  # one host sync
                mm = torch.stack([torch.stack(torch.aminmax(p)).double() for p in mparts])
                ext = iter(mm.abs().amax(1).tolist())
            for layer, fname, parts, finite in moments:
                vals = [next(ext) for p in parts if p.numel()]
                value = max(vals, default=0.0) if finite and vals else nan
                mrows.append((s, layer, fname, "norm_max", value))
        return jobs or None

    def _start_factor_job(self, s: int, jobs: list[tuple]) -> None:
        """Decompose now (``workers=0``) or hand the job to the worker thread."""
        if not any(isinstance(payload, tuple) for *_, payload in jobs):  # nothing to decompose
            if self._pending:  # merge after the jobs before it (they hold the spectra reused)
                done: Future = Future()
                done.set_result([])
                self._pending.append((s, jobs, done))
            else:
                self._merge(s, jobs, [])
            return
        if self._use_worker:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="recorder")
            # back-pressure: a worker that cannot keep up must not pile up factor copies
            while sum(not fut.done() for *_, fut in self._pending) > self.workers:
                self._pending[0][2].result()
                self._drain(wait=False)
            self._pending.append((s, jobs, self._pool.submit(self._factor_job, jobs)))
        else:
            self._merge(s, jobs, self._factor_job(jobs))

    def _factor_job(self, jobs: list[tuple]) -> list[tuple[np.ndarray, bool]]:
        """Spectra of the factors a job decomposes (any thread; reads copies when threaded)."""
        todo = [payload for *_, payload in jobs if isinstance(payload, tuple)]
        with torch.no_grad():
            return M.parts_spectra(todo, max_dim=self.max_dim, power_iters=self.power_iters)

    def _merge(self, s: int, jobs: list[tuple], results: list[tuple[np.ndarray, bool]]) -> None:
        """Add a factor job's rows (training thread, in step order)."""
        rows = self._metrics
        res = iter(results)
        empty = np.zeros(0, dtype=np.float64)
        for layer, fname, role, payload in jobs:
            key = (layer, fname)
            if payload is None:  # NaN/Inf in the factor: NaN metrics, no spectrum
                eig, estimated = empty, False
            elif payload == "reuse":
                eig, estimated = self._flast.get(key, (empty, False))
            else:
                eig, estimated = next(res)
                self._flast[key] = (eig, estimated)
            for metric, v in M.spectral_metrics(eig, role).items():
                rows.append((s, layer, fname, metric, v))
            if eig.size:
                rows.append((s, layer, fname, "spectrum_estimated", float(estimated)))
                self._spec_blocks.append((s, layer, fname, eig))
        self._cache = None

    def _drain(self, wait: bool) -> None:
        """Merge finished factor jobs in submission order (all of them when ``wait``)."""
        while self._pending and (wait or self._pending[0][2].done()):
            s, jobs, fut = self._pending.pop(0)
            self._merge(s, jobs, fut.result())

    def _record_memory(self, s: int) -> None:
        """Optimizer state bytes per layer/component and the process peaks since last time."""
        rows = self._memory
        if self._has_state_bytes:
            for layer, comps in self.optimizer.state_bytes().items():
                for comp, b in comps.items():
                    rows.append((s, str(layer), str(comp), int(b)))
        else:
            per: dict[tuple[str, str], int] = {}
            for p, (layer, _) in zip(self._params, self._names):
                st = self.optimizer.state.get(p)
                if st:
                    for key, b in M.state_bytes_by_key(st).items():
                        per[(layer, key)] = per.get((layer, key), 0) + b
            for (layer, key), b in per.items():
                rows.append((s, layer, key, b))
        rss = M.read_peak_rss()
        if rss is not None:
            rows.append((s, PROCESS, "peak_rss", rss))
            if self._peak_reset:
                M.reset_peak_rss()
        cuda = M.cuda_peak_bytes(reset=True)
        if cuda is not None:
            rows.append((s, PROCESS, "cuda_max_allocated", cuda))

    # ------------------------------------------------------------------ building
    def _build(self) -> Recording:
        """Turn the collected rows into a `Recording` (waits for pending factor jobs)."""
        self._drain(wait=True)
        for r in self._steps:
            if isinstance(r["loss"], torch.Tensor):
                r["loss"] = float(r["loss"])
        steps = frame_from_rows("steps", self._steps)
        metrics = frame_from_rows(
            "metrics",
            {k: [r[i] for r in self._metrics] for i, k in enumerate(COLUMNS["metrics"])},
        )
        blocks = sorted(self._spec_blocks, key=lambda b: b[0])  # stable: factor order kept
        sizes = [b[3].size for b in blocks]
        spectra = frame_from_rows(
            "spectra",
            {
                "step": np.repeat(np.array([b[0] for b in blocks], dtype=np.int64), sizes),
                "layer": np.repeat(np.array([b[1] for b in blocks], dtype=object), sizes),
                "factor": np.repeat(np.array([b[2] for b in blocks], dtype=object), sizes),
                "index": np.concatenate([np.arange(n) for n in sizes] or [np.zeros(0, int)]),
                "value": np.concatenate([b[3] for b in blocks] or [np.zeros(0)]),
            },
        )
        if self._use_worker:  # factor jobs finish after later steps' rows: restore step order
            metrics = metrics.sort_values("step", kind="stable", ignore_index=True)
        events = frame_from_rows("events", self._events)
        memory = frame_from_rows(
            "memory",
            {k: [r[i] for r in self._memory] for i, k in enumerate(COLUMNS["memory"])},
        )
        meta = dict(self.meta)
        return Recording(
            name=self.name,
            steps=steps,
            metrics=metrics,
            spectra=spectra,
            events=events,
            memory=memory,
            meta=meta,
            summary=self.summary,
        )
