"""The math of the recorded quantities: spectra, condition numbers, NaN/Inf counts, bytes, peaks.

Every function here reads its inputs and never writes to them: factors are copied and
upcast (CPU linear algebra refuses ``bfloat16``/``float16``) before any decomposition, so
the optimizer's own numbers are never touched.

Precision of spectra (``compute_dtype=None``, the default): a factor stored in float32 or
lower is decomposed in float32 first (cheaper than float64 for the product and the
eigensolver; numbers in ``benchmarks/RESULTS.md``); a factor whose float32 spectrum has
a condition number above `FLOAT32_MAX_COND` (or is singular) is decomposed again in
float64. Measured on
random factors of size 10 to 129, float32 eigenvalues of ``M M^T`` have a relative error
of about ``3e-8 * cond`` (``3e-4`` at the threshold), so every kept float32 eigenvalue is
good to better than ``1e-3`` relative, far below what a plot or a condition number on a
log axis shows; float64 (also for float64 factors, or ``compute_dtype=torch.float64``)
resolves condition numbers up to about ``1e13``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from singd.structures import BlockDiagonal, Dense, Diagonal

#: Factors with a dimension above this get a cheap estimate instead of a full spectrum.
DEFAULT_MAX_DIM = 1024
#: Power iterations used by the estimate for large factors.
DEFAULT_POWER_ITERS = 60
#: With ``compute_dtype=None``, a float32 spectrum is kept only up to this condition number;
#: above it (or when singular) the factor is decomposed again in float64.
FLOAT32_MAX_COND = 1e4

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _condition(eig_max: float, eig_min: float) -> float:
    """Condition number of a positive semi-definite matrix; ``inf`` when it is singular."""
    if not (math.isfinite(eig_max) and math.isfinite(eig_min)):
        return math.nan
    if eig_min <= 0.0:
        return math.inf
    return eig_max / eig_min


def _power_extremes(
    matvec, dim: int, dtype: torch.dtype, device: torch.device, iters: int, psd: bool = True
) -> tuple[float, float]:
    """Estimate (largest, smallest) eigenvalue of a symmetric operator by two power iterations
    (``psd``: the smallest is clipped at 0; otherwise it keeps its sign).

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
    return lam_max, max(lam_max - gap, 0.0) if psd else lam_max - gap


def _factor_parts(matrix: object) -> tuple[str, list[torch.Tensor]]:
    """The tensors holding a factor's entries, read without building a dense copy.

    Returns ``(kind, tensors)``: ``("diagonal", [diag])`` for ``singd.structures.Diagonal``,
    ``("blocks", [blocks, last])`` for a ``BlockDiagonal`` (full ``(nb, N, N)`` blocks and
    the ``(r, r)`` last block), ``("dense", [mat])`` for ``Dense`` and for plain tensors,
    and ``("dense", [matrix.to_dense()])`` for any other structure (triangular, Toeplitz,
    hierarchical). Only these documented attributes of ``singd.structures`` are used.
    The tensors may be the optimizer's own storage: read them, never write. Their
    Frobenius norm is the matrix's, and they hold a NaN/Inf exactly when the matrix does.
    """
    if isinstance(matrix, torch.Tensor):
        return "dense", [matrix.detach()]
    if isinstance(matrix, Diagonal):
        return "diagonal", [matrix.diag.detach()]
    if isinstance(matrix, BlockDiagonal):
        return "blocks", [matrix.blocks.detach(), matrix.last.detach()]
    if isinstance(matrix, Dense):
        return "dense", [matrix.mat.detach()]
    to_dense = getattr(matrix, "to_dense", None)
    if not callable(to_dense):
        raise TypeError(
            f"matrix must be a torch.Tensor or a structured matrix, got {type(matrix).__name__}"
        )
    return "dense", [to_dense().detach()]


def parts_spectra(
    items: list[tuple[str, str, list[torch.Tensor], int]],
    *,
    max_dim: int = DEFAULT_MAX_DIM,
    power_iters: int = DEFAULT_POWER_ITERS,
    compute_dtype: torch.dtype | None = None,
) -> list[tuple[np.ndarray, bool]]:
    """Eigenvalues (descending float64 numpy) and whether they are an estimate, per factor.

    ``items``: ``(role, kind, parts, dim)`` from `spectral_parts`, role ``"root"`` or
    ``"symmetric"``, each factor finite and of dimension >= 1 (check that first, e.g. with
    its norm; a NaN makes the eigensolver fail or return NaN). The parts may be copies of
    the stored tensors (decomposed on another thread).
    Structure-aware and batched: a diagonal factor's eigenvalues are its squared
    (``"root"``) entries, no decomposition; a block-diagonal factor is decomposed block by
    block; all square blocks of the same size and precision (dense factors of the same
    dimension across layers, the full blocks of block-diagonal factors) go through ONE
    batched product and ONE batched ``eigvalsh``; other structures go through their dense
    form; dense factors above ``max_dim`` get a power-iteration estimate of ``[max, min]``.
    Precision as in the module docstring (``compute_dtype=None``: float32 first, float64
    where needed). Inputs are never written. `spectral_metrics` turns a result into metrics.
    """
    for role, *_ in items:
        _check_role(role)
        if role == "momentum":
            raise ValueError("spectra: role must be 'root' or 'symmetric', not 'momentum'")
    return _spectra(items, max_dim, power_iters, compute_dtype, auto=compute_dtype is None)


def spectral_metrics(eigenvalues: np.ndarray, role: str) -> dict[str, float]:
    """``eig_min``, ``eig_max``, ``cond`` (and for ``"root"`` ``sv_min``, ``sv_max``) of a
    descending spectrum (NaN for an empty one)."""
    if eigenvalues.size == 0:
        return dict.fromkeys(_spectral_keys(role), math.nan)
    eig_max, eig_min = float(eigenvalues[0]), float(eigenvalues[-1])
    out = {"eig_min": eig_min, "eig_max": eig_max, "cond": _condition(eig_max, eig_min)}
    if role == "root":
        out["sv_min"] = math.sqrt(max(eig_min, 0.0))
        out["sv_max"] = math.sqrt(max(eig_max, 0.0))
    return out


def damped_condition(eig_max: float, eig_min: float, damping: float) -> float:
    """Condition number of ``F + damping I`` for a symmetric ``F`` (what KFAC inverts):
    ``inf`` once the smallest eigenvalue reaches ``-damping`` (the Cholesky fails there)."""
    return _condition(eig_max + damping, eig_min + damping)


def _spectral_keys(role: str) -> list[str]:
    """Names of the metrics `spectral_metrics` gives for ``role``."""
    return ["eig_min", "eig_max", "cond"] + (["sv_min", "sv_max"] if role == "root" else [])


def _check_role(role: str) -> None:
    """Refuse an unknown factor role."""
    if role not in ("root", "symmetric", "momentum"):
        raise ValueError(f"role must be 'root', 'symmetric' or 'momentum', got {role!r}")


def spectral_parts(matrix: object, role: str, structure: str) -> tuple[str, list[torch.Tensor]]:
    """`_factor_parts` as the spectra read them: a dense tensor whose structure is said to
    be ``"diagonal"`` gets kind ``"dense-diagonal"`` (its diagonal is used)."""
    _check_role(role)
    if isinstance(matrix, torch.Tensor) and matrix.dim() != 2:
        raise TypeError("matrix must be a 2-d torch.Tensor")
    kind, parts = _factor_parts(matrix)
    if kind == "dense" and structure == "diagonal" and role != "momentum":
        kind = "dense-diagonal"  # a dense tensor said to be diagonal: use its diagonal
    return kind, parts


def _spectra(
    prepared: list[tuple[str, str, list[torch.Tensor], int]],
    max_dim: int,
    power_iters: int,
    compute_dtype: torch.dtype | None,
    *,
    auto: bool,
) -> list[tuple[np.ndarray, bool]]:
    """Spectra of ``(role, kind, parts, dim)`` factors (see `parts_spectra`).

    With ``auto``, float32 results above `FLOAT32_MAX_COND` are redone in float64. Few
    torch calls (per group of same-sized blocks: one stack, one product, one ``eigvalsh``,
    one copy to the host); the per-factor work is numpy. This matters on a worker thread:
    each torch call hands the GIL over, and the training thread waits at each hand-over.
    """
    n = len(prepared)
    if not n:
        return []
    pieces: list[list[np.ndarray]] = [[] for _ in range(n)]
    groups: dict[tuple[int, str, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
    estimated: dict[int, torch.Tensor] = {}
    dtypes: list[torch.dtype] = []
    for i, (role, kind, parts, dim) in enumerate(prepared):
        if compute_dtype is not None:
            dt = compute_dtype
        else:  # float32 first unless the factor is stored in float64
            dt = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        dtypes.append(dt)
        if kind in ("diagonal", "dense-diagonal"):
            d = parts[0] if kind == "diagonal" else torch.diagonal(parts[0])
            d = d.to("cpu", torch.float64).numpy()  # no decomposition: exact in float64
            pieces[i].append(d * d if role == "root" else d.copy())
            continue
        if kind == "dense" and dim > max_dim:
            estimated[i] = _estimate(parts[0].to(dt), role, power_iters)
            continue
        batches = [parts[0]] if kind == "dense" else [parts[0], parts[1]]
        for b in batches:
            if b.numel():
                groups.setdefault((b.shape[-1], role, dt), []).append((i, b))
    for (_, role, dt), members in groups.items():
        mats = [b if b.dim() == 3 else b[None] for _, b in members]
        stack = torch.cat(mats) if len(mats) > 1 else mats[0]
        if stack.dtype != dt:
            stack = stack.to(dt)  # one upcast copy of the whole group
        sym = stack @ stack.mT if role == "root" else (stack + stack.mT) / 2
        eig = torch.linalg.eigvalsh(sym).to("cpu", torch.float64).numpy()
        start = 0
        for (i, _), m in zip(members, mats):
            pieces[i].append(eig[start : start + m.shape[0]].reshape(-1))
            start += m.shape[0]
    out: list[tuple[np.ndarray, bool]] = []
    redo: list[int] = []
    for i, (role, *_) in enumerate(prepared):
        if i in estimated:
            out.append((estimated[i].numpy().copy(), True))
            continue
        parts_i = pieces[i]
        eig_np = np.concatenate(parts_i) if len(parts_i) > 1 else parts_i[0].copy()
        eig_np.sort()
        eig_np = eig_np[::-1].copy()  # descending
        if role == "root":
            np.maximum(eig_np, 0.0, out=eig_np)
        out.append((eig_np, False))
        if auto and dtypes[i] != torch.float64 and eig_np.size:
            hi, lo = eig_np[0], eig_np[-1]
            if not lo * FLOAT32_MAX_COND >= hi:  # ill-conditioned, singular or NaN
                redo.append(i)
    if redo:
        again = _spectra(
            [prepared[i] for i in redo], max_dim, power_iters, torch.float64, auto=False
        )
        for i, res in zip(redo, again):
            out[i] = res
    return out


#: Power iterations of the budget's cheap extremes (`batched_extremes`).
BUDGET_POWER_ITERS = 12


def batched_extremes(
    items: list[tuple[str, torch.Tensor]], iters: int = BUDGET_POWER_ITERS
) -> list[np.ndarray]:
    """``[max, min]`` eigenvalue estimates of dense factors ``(role, matrix)``, batched: per
    group of one size and role, one product (``M M^T`` for ``"root"``, the symmetric part
    otherwise) and ``iters`` batched power steps for the largest eigenvalue, then as many
    on ``max I - S`` for the smallest (signed for ``"symmetric"``). Far cheaper than a
    decomposition; the smallest eigenvalue is rough (flagged as an estimate by callers)."""
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (role, m) in enumerate(items):
        groups.setdefault((m.shape[-1], role), []).append(i)
    gen = torch.Generator().manual_seed(0)
    for (n, role), idx in groups.items():
        stack = torch.stack([items[i][1].float() for i in idx])
        sym = stack @ stack.mT if role == "root" else (stack + stack.mT) / 2
        v0 = torch.randn(len(idx), n, 1, generator=gen).to(sym.device)
        hi = _batched_top(sym, v0, iters, shift=None)
        gap = _batched_top(sym, v0, iters, shift=hi)
        lo = hi - gap
        if role == "root":
            lo = lo.clamp_min(0.0)
        pairs = torch.stack([hi, lo], 1).to("cpu", torch.float64).numpy()
        for k, i in enumerate(idx):
            out[i] = pairs[k].copy()
    return out  # type: ignore[return-value]


def _batched_top(
    sym: torch.Tensor, v: torch.Tensor, iters: int, shift: torch.Tensor | None
) -> torch.Tensor:
    """Largest eigenvalue of each ``sym`` (or of ``shift I - sym``) by batched power steps."""
    lam = torch.zeros(sym.shape[0], device=sym.device)
    for _ in range(iters):
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        w = sym @ v
        if shift is not None:
            w = shift[:, None, None] * v - w
        lam = (v * w).sum(dim=(1, 2))
        v = w
    return lam


def diag_sum(part: torch.Tensor, kind: str) -> torch.Tensor:
    """Sum of the diagonal entries a stored tensor contributes to its matrix."""
    if kind == "diagonal" or part.dim() == 1:
        return part.sum()
    return torch.diagonal(part, dim1=-2, dim2=-1).sum()


def _estimate(m: torch.Tensor, role: str, power_iters: int) -> torch.Tensor:
    """``[max, min]`` eigenvalue estimate of ``M M^T`` (root) or ``(M + M^T) / 2``."""
    if role == "root":

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return m @ (m.T @ v)

    else:
        sym = (m + m.T) / 2

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return sym @ v

    psd = role == "root"
    hi, lo = _power_extremes(matvec, m.shape[0], m.dtype, m.device, power_iters, psd=psd)
    return torch.tensor([hi, lo], dtype=torch.float64)


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


def state_bytes_by_key(state: Mapping[str, object]) -> dict[str, int]:
    """Bytes per state key of one parameter's optimizer state (tensors only; scalars skipped)."""
    out: dict[str, int] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[str(key)] = out.get(str(key), 0) + value.numel() * value.element_size()
    return out


def second_moment_summaries(items: list[tuple[torch.Tensor, float]]) -> list[dict[str, float]]:
    """`second_moment_summary` of many tensors (one host sync off the CPU).

    Reductions run in each tensor's own storage (no copy; ``aminmax`` and a sum in the
    tensor's precision, float32 for 16-bit ones: torch's cascade summation keeps the mean
    to about 1e-6 relative, and a float64-accumulating sum is slower), so NaN
    propagates into the results (and the condition number becomes NaN).
    """
    if not items:
        return []
    if all(v.device.type == "cpu" for v, _ in items):  # no sync to save: floats at once
        values = []
        for v, _ in items:
            x = v.detach()
            if x.numel() == 0:
                values.append((math.nan, math.nan, math.nan))
                continue
            lo, hi = torch.aminmax(x)
            values.append((float(lo), float(hi), float(_sum(x))))
    else:
        parts: list[torch.Tensor] = []
        for v, _ in items:
            x = v.detach()
            if x.numel() == 0:
                parts.append(torch.full((3,), math.nan, dtype=torch.float64, device=x.device))
                continue
            lo, hi = torch.aminmax(x)
            parts.append(torch.stack([lo.double(), hi.double(), _sum(x).double()]))
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


def _sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor's entries, 16-bit ones accumulated in float32."""
    return x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()


_FDS: dict[tuple[str, int], tuple[int, int]] = {}  # (path, flags) -> (pid, open fd)


def _proc_fd(path: str, flags: int) -> int:
    """An fd of a ``/proc/self`` file, kept open (reopening costs more than a read);
    reopened after a fork (the old one would still show the parent)."""
    pid = os.getpid()
    got = _FDS.get((path, flags))
    if got is not None and got[0] == pid:
        return got[1]
    fd = os.open(path, flags)  # OSError goes to the caller
    if got is not None and got[0] == pid:  # pragma: no cover - another thread won
        os.close(fd)
        return got[1]
    _FDS[(path, flags)] = (pid, fd)
    return fd


def _forget_fd(path: str, flags: int) -> None:
    """Close and drop a kept fd (after an error)."""
    got = _FDS.pop((path, flags), None)
    if got is not None and got[0] == os.getpid():
        with contextlib.suppress(OSError):
            os.close(got[1])


def read_status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (e.g. ``"VmRSS"``, ``"VmHWM"``) in bytes, or
    None where there is no such file (systems other than Linux)."""
    try:
        data = os.pread(_proc_fd(_STATUS, os.O_RDONLY), 1 << 16, 0)
    except OSError:
        _forget_fd(_STATUS, os.O_RDONLY)
        return None
    start = data.find(field.encode() + b":")
    if start < 0:
        return None
    fields = data[start : data.find(b"\n", start)].split()
    return int(fields[1]) * 1024  # the kernel reports kB


def read_peak_rss() -> int | None:
    """Peak resident set size of this process in bytes (Linux ``VmHWM``), or None elsewhere."""
    return read_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS by writing "5" to ``/proc/self/clear_refs``.

    Returns whether it worked (it fails without permission, e.g. in some containers, and
    on systems other than Linux); on failure the peak stays the peak since process start.
    """
    try:
        os.pwrite(_proc_fd(_CLEAR_REFS, os.O_WRONLY), b"5", 0)
        return True
    except OSError:
        _forget_fd(_CLEAR_REFS, os.O_WRONLY)
        return False


def cuda_peak_bytes(device: torch.device | int | None = None, reset: bool = True) -> int | None:
    """``torch.cuda.max_memory_allocated`` (then reset), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    peak = int(torch.cuda.max_memory_allocated(device))
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak
