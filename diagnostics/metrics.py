"""Quantities the recorder measures: spectra, condition numbers, non-finite counts, bytes, peaks.

Every function here reads its inputs and never writes to them: factors are copied and
upcast (``float64`` by default; CPU linear algebra refuses ``bfloat16``/``float16``)
before any decomposition, so the optimizer's own numbers are never touched.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from singd.views import FactorView

#: Factors with a dimension above this get a cheap estimate instead of a full spectrum.
DEFAULT_MAX_DIM = 1024
#: Power iterations used by the estimate for large factors.
DEFAULT_POWER_ITERS = 60

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclass(frozen=True)
class FactorSummary:
    """What one factor looks like at one step: its preconditioner spectrum and scalar metrics.

    ``eigenvalues`` are those of the preconditioner factor the matrix builds (``M M^T`` for
    role ``"root"``, ``M`` itself for ``"symmetric"``), sorted descending, ``float64``; empty
    for momenta and for factors holding NaN/Inf. For ``estimated`` summaries (dimension
    above ``max_dim``) it holds only the two estimated extremes ``[max, min]``.
    """

    eigenvalues: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)
    estimated: bool = False


@dataclass(frozen=True)
class NonfiniteCounts:
    """How many NaN, +Inf and -Inf entries a tensor holds, and its largest finite magnitude."""

    nan: int
    posinf: int
    neginf: int
    finite_absmax: float
    numel: int

    @property
    def total(self) -> int:
        """Number of non-finite entries."""
        return self.nan + self.posinf + self.neginf


def _as_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached copy of ``t`` in ``dtype`` on the CPU-or-current device (never a view)."""
    return t.detach().to(dtype=dtype, copy=True)


def _condition(eig_max: float, eig_min: float) -> float:
    """Condition number of a positive semi-definite matrix; ``inf`` when it is singular."""
    if not (math.isfinite(eig_max) and math.isfinite(eig_min)):
        return math.nan
    if eig_min <= 0.0:
        return math.inf
    return eig_max / eig_min


def _power_extremes(
    matvec, dim: int, dtype: torch.dtype, device: torch.device, iters: int
) -> tuple[float, float]:
    """Estimate (largest, smallest) eigenvalue of a PSD operator by two power iterations.

    The largest comes from plain power iteration; the smallest from power iteration on
    ``lam_max * I - A`` (whose top eigenvalue is ``lam_max - lam_min``). The start vector
    is drawn from a fixed seed so that estimates are reproducible. Accuracy of the
    smallest eigenvalue is about ``lam_max * 1e-3`` after 60 iterations for well-separated
    spectra; it is an estimate, flagged as such.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    v0 = torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    def top(op) -> float:
        v = v0 / v0.norm()
        lam = 0.0
        for _ in range(iters):
            w = op(v)
            lam = float(torch.dot(v, w))
            n = w.norm()
            if n == 0:
                return 0.0
            v = w / n
        return lam

    lam_max = top(matvec)
    gap = top(lambda v: lam_max * v - matvec(v))
    return lam_max, max(lam_max - gap, 0.0)


def summarize_factor(
    view: FactorView,
    *,
    max_dim: int = DEFAULT_MAX_DIM,
    power_iters: int = DEFAULT_POWER_ITERS,
    spectrum: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> FactorSummary:
    """Spectrum and scalar metrics of one preconditioner factor (computed on an upcast copy).

    See `summarize_matrix` for the metrics; this reads the factor through its view.
    """
    if not isinstance(view, FactorView):
        raise TypeError(f"view must be a singd.views.FactorView, got {type(view).__name__}")
    return summarize_matrix(
        view.dense(),
        view.role,
        view.structure,
        max_dim=max_dim,
        power_iters=power_iters,
        spectrum=spectrum,
        compute_dtype=compute_dtype,
    )


def summarize_matrix(
    matrix: torch.Tensor,
    role: str,
    structure: str = "dense",
    *,
    max_dim: int = DEFAULT_MAX_DIM,
    power_iters: int = DEFAULT_POWER_ITERS,
    spectrum: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> FactorSummary:
    """Spectrum and scalar metrics of a dense factor ``matrix`` with the given role.

    Metrics by role: ``"root"`` (SINGD's K, C): ``sv_min``/``sv_max`` (singular values of
    the factor), ``eig_min``/``eig_max``/``cond`` of ``M M^T``, ``trace`` of ``M M^T``
    (``= ||M||_F^2``, exact), ``norm_fro``. ``"symmetric"`` (KFAC): the same of ``M``
    without singular values. ``"momentum"``: ``norm_fro`` and ``norm_max``. With
    ``spectrum=False`` only cheap metrics (trace, norms) are computed.

    The spectrum is computed in ``compute_dtype`` (float64 by default) on a copy: for
    ``"root"`` as the eigenvalues of ``M M^T`` by a symmetric eigensolver (about 3x faster
    than an SVD on near-identity factors; absolute accuracy about ``1e-16 * eig_max``, so
    condition numbers up to about ``1e13`` are resolved), for ``"symmetric"`` of
    ``(M + M^T) / 2``; diagonal factors need no decomposition. Factors with a dimension
    above ``max_dim`` get an *estimate* of the extremes only (power iteration on ``A`` and
    on ``eig_max * I - A``, ``power_iters`` steps each; `FactorSummary.estimated` is True).
    """
    if role not in ("root", "symmetric", "momentum"):
        raise ValueError(f"role must be 'root', 'symmetric' or 'momentum', got {role!r}")
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise TypeError("matrix must be a 2-d torch.Tensor")
    m = _as_float(matrix, compute_dtype)
    finite = bool(torch.isfinite(m).all())
    empty = np.zeros(0, dtype=np.float64)
    nan = math.nan
    if role == "momentum":
        metrics = {
            "norm_fro": float(m.norm()) if finite else nan,
            "norm_max": float(m.abs().max()) if (finite and m.numel()) else nan,
        }
        return FactorSummary(empty, metrics)
    if role == "root":
        metrics = {"trace": float((m * m).sum()) if finite else nan}
        metrics["norm_fro"] = math.sqrt(metrics["trace"]) if finite else nan
    else:
        metrics = {"trace": float(torch.diagonal(m).sum()) if finite else nan}
        metrics["norm_fro"] = float(m.norm()) if finite else nan
    if not spectrum:
        return FactorSummary(empty, metrics)
    keys = ["eig_min", "eig_max", "cond"] + (["sv_min", "sv_max"] if role == "root" else [])
    if not finite or m.numel() == 0:
        metrics.update(dict.fromkeys(keys, nan))
        return FactorSummary(empty, metrics)
    dim = m.shape[0]
    estimated = False
    if structure == "diagonal" or _is_diagonal(m):
        d = torch.diagonal(m)
        eig = d * d if role == "root" else d
        eig = torch.sort(eig, descending=True).values
    elif dim <= max_dim:
        if role == "root":
            eig = torch.linalg.eigvalsh(m @ m.T).flip(0).clamp_min(0.0)
        else:
            eig = torch.linalg.eigvalsh((m + m.T) / 2).flip(0)
    else:
        estimated = True
        if role == "root":

            def matvec(v: torch.Tensor) -> torch.Tensor:
                return m @ (m.T @ v)

        else:
            sym = (m + m.T) / 2

            def matvec(v: torch.Tensor) -> torch.Tensor:
                return sym @ v

        hi, lo = _power_extremes(matvec, dim, compute_dtype, m.device, power_iters)
        eig = torch.tensor([hi, lo], dtype=torch.float64)
    eig_np = eig.detach().to("cpu", torch.float64).numpy().copy()
    eig_max, eig_min = float(eig_np[0]), float(eig_np[-1])
    metrics["eig_min"] = eig_min
    metrics["eig_max"] = eig_max
    metrics["cond"] = _condition(eig_max, eig_min)
    if role == "root":
        metrics["sv_max"] = math.sqrt(max(eig_max, 0.0))
        metrics["sv_min"] = math.sqrt(max(eig_min, 0.0))
    return FactorSummary(eig_np, metrics, estimated)


def _is_diagonal(m: torch.Tensor) -> bool:
    """Whether a square matrix has no off-diagonal entry (cheap test before an SVD)."""
    return m.shape[0] > 1 and bool((m - torch.diag(torch.diagonal(m))).count_nonzero() == 0)


def nonfinite_counts(t: torch.Tensor) -> NonfiniteCounts:
    """Count NaN, +Inf and -Inf entries of ``t`` and its largest finite magnitude."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
    vec = count_vector(t)
    nan, pos, neg, absmax = vec.tolist()
    return NonfiniteCounts(int(nan), int(pos), int(neg), float(absmax), t.numel())


def count_vector(t: torch.Tensor) -> torch.Tensor:
    """``[nan, +inf, -inf, finite absmax]`` of ``t`` as a float64 tensor on ``t``'s device.

    Stays on the device (no host sync) so that many can be stacked and read at once.
    """
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    if not x.is_floating_point() or x.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=x.device)
    nan = torch.isnan(x).sum()
    pos = torch.isposinf(x).sum()
    neg = torch.isneginf(x).sum()
    absmax = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype)).max()
    return torch.stack([nan.double(), pos.double(), neg.double(), absmax.double()])


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor (on device, no host sync): whether every entry of every tensor is finite.

    Uses one fused norm per device/dtype group; a norm that overflows counts as
    non-finite, which only costs a detailed (and then empty) inspection.
    """
    ts = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    if not ts:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.nn.utils.get_total_norm(ts, foreach=None))


def tensor_bytes(t: object) -> int:
    """Bytes of storage a tensor or a structured matrix holds (``numel * itemsize``)."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    numel = getattr(t, "numel", None)
    dtype = getattr(t, "dtype", None)
    if callable(numel) and isinstance(dtype, torch.dtype):
        return int(numel()) * torch.empty((), dtype=dtype).element_size()
    raise TypeError(f"t must be a torch.Tensor or a structured matrix, got {type(t).__name__}")


def state_bytes_by_key(state: Mapping[str, object]) -> dict[str, int]:
    """Bytes per state key of one parameter's optimizer state (tensors only; scalars skipped)."""
    out: dict[str, int] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[str(key)] = out.get(str(key), 0) + tensor_bytes(value)
    return out


def second_moment_summary(v: torch.Tensor, eps: float = 0.0) -> dict[str, float]:
    """Min/max/mean of a second-moment estimate and the condition number of ``sqrt(v) + eps``.

    This is the diagonal preconditioner Adam-type optimizers divide by.
    """
    return second_moment_summaries([(v, eps)])[0]


def second_moment_summaries(items: list[tuple[torch.Tensor, float]]) -> list[dict[str, float]]:
    """`second_moment_summary` of many tensors with one host sync.

    Reductions run in each tensor's own storage (no copy; ``aminmax`` and a float64 sum),
    so NaN propagates into the results (and the condition number becomes NaN).
    """
    parts: list[torch.Tensor] = []
    for v, _ in items:
        x = v.detach()
        if x.numel() == 0:
            parts.append(torch.full((3,), math.nan, dtype=torch.float64, device=x.device))
            continue
        lo, hi = torch.aminmax(x)
        parts.append(torch.stack([lo.double(), hi.double(), x.sum(dtype=torch.float64)]))
    if not parts:
        return []
    dev = parts[0].device
    values = torch.stack([p.to(dev) for p in parts]).tolist()
    out = []
    for (v, eps), (lo, hi, total) in zip(items, values):
        mean = total / v.numel() if v.numel() else math.nan
        if not all(math.isfinite(a) for a in (lo, hi, mean)):
            out.append({"min": lo, "max": hi, "mean": mean, "cond": math.nan})
            continue
        d_lo = math.sqrt(max(lo, 0.0)) + eps
        d_hi = math.sqrt(max(hi, 0.0)) + eps
        out.append({"min": lo, "max": hi, "mean": mean, "cond": _condition(d_hi, d_lo)})
    return out


def read_peak_rss() -> int | None:
    """Peak resident set size of this process in bytes (Linux ``VmHWM``), or None elsewhere."""
    try:
        fd = os.open(_STATUS, os.O_RDONLY)
        try:
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError:
        return None
    start = data.find(b"VmHWM:")
    if start < 0:
        return None
    fields = data[start : data.find(b"\n", start)].split()
    return int(fields[1]) * 1024  # the kernel reports kB


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS by writing "5" to ``/proc/self/clear_refs``.

    Returns whether it worked (it fails without permission, e.g. in some containers, and
    on systems other than Linux); on failure the peak stays the peak since process start.
    """
    try:
        fd = os.open(_CLEAR_REFS, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def cuda_peak_bytes(device: torch.device | int | None = None, reset: bool = True) -> int | None:
    """``torch.cuda.max_memory_allocated`` (then reset), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    peak = int(torch.cuda.max_memory_allocated(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak
