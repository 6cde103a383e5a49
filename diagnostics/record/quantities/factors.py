"""`FactorSpectra`: what each preconditioner factor looks like (norms, traces, spectra).

The one place where factor summaries are made. Factors are read through the optimizer's
public view ``preconditioner_factors()``, structure-aware through `metrics.spectral_parts`
(diagonal factors: their entries, no decomposition; block-diagonal: per block; others
dense), and decomposed in batches by `metrics.parts_spectra` on upcast copies. Metrics by
role: ``"root"`` (SINGD's K, C): ``norm_fro``, ``trace`` of ``M M^T`` (= the squared
Frobenius norm, exact), ``eig_min``/``eig_max``/``cond`` of ``M M^T``, ``sv_min``/``sv_max``;
``"symmetric"`` (KFAC): the same of ``M`` without singular values, ``eig_min`` signed (a
factor that lost definiteness in low precision shows it), and ``cond_damped``, the
condition number of ``M + damping I`` (what KFAC inverts); ``"momentum"``: ``norm_fro`` and
``norm_max``. Each layer's damping (from its parameter group) is a row of factor
``"(optimizer)"``. A factor holding NaN/Inf gets NaN metrics and no spectrum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from diagnostics.record import metrics as M
from diagnostics.record.cache import ChangeCache, Entry, Stamp, stamp
from diagnostics.record.quantities.base import MetricRow, Probe, SpectrumBlock, Tables

_EMPTY = np.zeros(0, dtype=np.float64)


class Factor(NamedTuple):
    """One factor of one layer as the view gives it, with its stored tensors."""

    layer: str
    name: str
    view: Any
    parts: list[torch.Tensor]
    kind: str
    stamp: Stamp | None

    @property
    def key(self) -> Hashable:
        """Its key in the change caches."""
        return (self.layer, self.name)


class JobItem(NamedTuple):
    """What a spectra job does with one factor: ``plan`` is ``"nan"`` (NaN metrics, no
    spectrum), ``"reuse"`` (the spectrum in ``entry``, unchanged since), ``"decompose"``
    (``spec`` = ``(role, kind, parts, dim)`` for `metrics.parts_spectra`; the result
    goes into ``entry``) or ``"estimate"`` (the budget's choice: ``spec`` = ``(role,
    matrix)`` for `metrics.batched_extremes`, not cached)."""

    layer: str
    factor: str
    role: str
    plan: str
    spec: tuple | None = None
    entry: Entry | None = None
    damping: float = math.nan


@dataclass
class SpectraJob:
    """The spectra of one recorded step, computed inline or on the worker thread."""

    step: int
    items: list[JobItem]

    @property
    def decomposes(self) -> bool:
        """Whether any factor needs a decomposition (or an estimate)."""
        return any(it.plan in ("decompose", "estimate") for it in self.items)


class FactorSpectra:
    """Factor norms and traces on recorded steps; spectra, extreme eigenvalues and
    condition numbers with ``spectra``.

    Unchanged factors (see `diagnostics.record.cache`) keep their norms (``norms`` cache)
    and are not decomposed again (``spectra`` cache): their last spectrum is recorded for
    the new step. With ``copy`` (a worker thread decomposes), the factors to decompose are
    copied first, since the optimizer changes them while the worker reads.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        spectra: bool,
        max_dim: int,
        power_iters: int,
        copy: bool,
        norms: ChangeCache,
        spectra_cache: ChangeCache,
        damping: Callable[[str], float] | None = None,
        budget: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.damping = damping if damping is not None else (lambda layer: math.nan)
        self.budget = budget
        #: seconds per dim^3 of a decomposition, learned from the jobs (a first guess)
        self._per_cube = 2e-10
        self._exact_at: dict[Hashable, int] = {}
        #: seconds spent computing spectra (any thread), for the recorder's budget
        self.spent = 0.0
        self.active = callable(getattr(optimizer, "preconditioner_factors", None))
        self.spectra = spectra
        self.max_dim = max_dim
        self.power_iters = power_iters
        self.copy = copy
        self._norms = norms
        self._spectra = spectra_cache

    def read(self) -> list[Factor]:
        """The factors of ``preconditioner_factors()`` (none for optimizers without it).

        The stored tensors may be the optimizer's own storage: they are only read.
        """
        if not self.active:
            return []
        out = []
        for layer, lf in self.optimizer.preconditioner_factors().items():
            for fname, view in lf.factors.items():
                kind, parts = M.spectral_parts(view.matrix, view.role, view.structure)
                current = stamp(view.matrix, parts)
                out.append(Factor(str(layer), str(fname), view, parts, kind, current))
        return out

    def probes(self, factors: list[Factor], cached: bool = False) -> list[Probe]:
        """One probe per stored tensor (several of one factor merge into one event); with
        ``cached``, unchanged factors' probes carry their cached norms."""
        out = []
        for f in factors:
            entry = self._norms.get(f.key, f.view.matrix, f.stamp) if cached else None
            known = entry.value if entry is not None else [None] * len(f.parts)
            for t, n in zip(f.parts, known):
                out.append(Probe("preconditioner update", f.layer, f.name, t, n))
        return out

    def record(
        self,
        step: int,
        factors: list[Factor],
        norms: list[float],
        tables: Tables,
        available: float | None = None,
    ) -> SpectraJob | None:
        """Cheap metrics from the fused norms now; the spectra job to run (or None).

        ``available``: seconds the budget allows for this step's decompositions (None:
        decompose every changed factor)."""
        squares: list[float] = []
        k = 0
        for f in factors:
            part_norms = norms[k : k + len(f.parts)]
            k += len(f.parts)
            self._norms.put(f.key, f.stamp, part_norms)
            squares.append(sum(n * n for n in part_norms))
        rows, nan = tables.metrics, math.nan
        symmetric, momenta, items = [], [], []
        for layer in dict.fromkeys(f.layer for f in factors):
            d = self.damping(layer)
            if math.isfinite(d):
                rows.append(MetricRow(step, layer, "(optimizer)", "damping", d))
        for f, sq in zip(factors, squares):
            finite = math.isfinite(sq)
            rows.append(
                MetricRow(step, f.layer, f.name, "norm_fro", math.sqrt(sq) if finite else nan)
            )
            role = f.view.role
            if role == "root":
                rows.append(MetricRow(step, f.layer, f.name, "trace", sq if finite else nan))
            elif role == "symmetric":
                symmetric.append((f, finite))
            if not self.spectra:
                continue
            if role == "momentum":
                momenta.append((f, finite))
            else:
                items.append(self._plan(f, finite))
        self._traces(step, symmetric, tables)
        self._max_norms(step, momenta, tables)
        if available is not None:
            items = self._within(step, factors, items, available)
        for it in items:
            if it.plan in ("decompose", "reuse"):
                self._exact_at[(it.layer, it.factor)] = step
        return SpectraJob(step, items) if items else None

    def _within(
        self, step: int, factors: list[Factor], items: list[JobItem], available: float
    ) -> list[JobItem]:
        """The budget's choice: of the factors to decompose, the stalest (longest since an
        exact spectrum) and, among equally stale ones, the cheapest get exact spectra while
        their predicted cost fits ``available``; the other dense ones get `batched_extremes`
        (plan ``"estimate"``), the rest stay exact (diagonal ones cost nothing)."""
        by_key = {f.key: f for f in factors}
        todo = [
            i
            for i, it in enumerate(items)
            if it.plan == "decompose" and it.spec[1] == "dense" and it.spec[3] <= self.max_dim
        ]

        def rank(i: int) -> tuple:
            it = items[i]
            since = step - self._exact_at.get((it.layer, it.factor), -(1 << 30))
            return (-since, it.spec[3])

        spend = 0.0
        out = list(items)
        for i in sorted(todo, key=rank):
            it = items[i]
            cost = self._per_cube * it.spec[3] ** 3
            if spend + cost <= available:
                spend += cost
                continue
            if it.entry is not None:
                self._spectra.drop((it.layer, it.factor))
            m = it.spec[2][0]
            f = by_key[(it.layer, it.factor)]
            out[i] = it._replace(plan="estimate", spec=(f.view.role, m), entry=None)
        return out

    def _plan(self, f: Factor, finite: bool) -> JobItem:
        """Decompose the factor, reuse its last spectrum, or give NaN metrics.

        With a time budget, `_within` then turns some decompositions into estimates.
        """
        role, dim = f.view.role, f.view.dim
        d = self.damping(f.layer) if role == "symmetric" else math.nan
        if not finite or dim == 0:
            self._spectra.drop(f.key)
            return JobItem(f.layer, f.name, role, "nan", damping=d)
        entry = self._spectra.get(f.key, f.view.matrix, f.stamp)
        if entry is not None:
            return JobItem(f.layer, f.name, role, "reuse", entry=entry, damping=d)
        entry = self._spectra.put(f.key, f.stamp)
        parts = [p.clone() for p in f.parts] if self.copy else f.parts
        spec = (role, f.kind, parts, dim)
        return JobItem(f.layer, f.name, role, "decompose", spec, entry, d)

    def _traces(self, step: int, symmetric: list[tuple[Factor, bool]], tables: Tables) -> None:
        """Traces of symmetric factors (KFAC), one host sync."""
        if not symmetric:
            return
        traces = torch.stack(
            [sum(M.diag_sum(p.double(), f.kind) for p in f.parts) for f, _ in symmetric]
        ).tolist()
        for (f, finite), tr in zip(symmetric, traces):
            value = float(tr) if finite else math.nan
            tables.metrics.append(MetricRow(step, f.layer, f.name, "trace", value))

    def _max_norms(self, step: int, momenta: list[tuple[Factor, bool]], tables: Tables) -> None:
        """Largest magnitude of each momentum (by ``aminmax``, faster than the inf-norm)."""
        if not momenta:
            return
        parts = [p for f, _ in momenta for p in f.parts if p.numel()]
        if not parts:
            ext = iter([])
        elif all(p.device.type == "cpu" for p in parts):  # no sync to save: floats at once
            ext = iter([max(-float(lo), float(hi)) for lo, hi in map(torch.aminmax, parts)])
        else:  # one host sync
            mm = torch.stack([torch.stack(torch.aminmax(p)).double() for p in parts])
            ext = iter(mm.abs().amax(1).tolist())
        for f, finite in momenta:
            vals = [next(ext) for p in f.parts if p.numel()]
            value = max(vals, default=0.0) if finite and vals else math.nan
            tables.metrics.append(MetricRow(step, f.layer, f.name, "norm_max", value))

    def compute(self, job: SpectraJob) -> list[tuple[np.ndarray, bool]]:
        """Spectra of the factors a job decomposes, then the estimates of those it only
        estimates (any thread; reads copies when threaded). Learns the cost per dim^3."""
        todo = [it.spec for it in job.items if it.plan == "decompose"]
        rough = [it.spec for it in job.items if it.plan == "estimate"]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = M.parts_spectra(todo, max_dim=self.max_dim, power_iters=self.power_iters)
            t1 = time.perf_counter()
            out += [(e, True) for e in M.batched_extremes(rough)] if rough else []
        cubes = sum(spec[3] ** 3 for spec in todo if spec[1] == "dense")
        if cubes:
            self._per_cube = 0.5 * self._per_cube + 0.5 * (t1 - t0) / cubes
        self.spent += time.perf_counter() - t0
        return out

    def merge(self, job: SpectraJob, results: list[tuple[np.ndarray, bool]], tables: Tables):
        """Add a job's rows (training thread, in step order)."""
        n_exact = sum(it.plan == "decompose" for it in job.items)
        exact, rough = iter(results[:n_exact]), iter(results[n_exact:])
        s = job.step
        for it in job.items:
            if it.plan == "nan":
                eig, estimated = _EMPTY, False
            elif it.plan == "reuse":
                eig, estimated = it.entry.value or (_EMPTY, False)
            else:
                eig, estimated = next(exact if it.plan == "decompose" else rough)
                if it.entry is not None:
                    it.entry.value = (eig, estimated)
            found = M.spectral_metrics(eig, it.role)
            if math.isfinite(it.damping):
                found["cond_damped"] = M.damped_condition(
                    found["eig_max"], found["eig_min"], it.damping
                )
            for metric, v in found.items():
                tables.metrics.append(MetricRow(s, it.layer, it.factor, metric, v))
            if eig.size:
                tables.metrics.append(
                    MetricRow(s, it.layer, it.factor, "spectrum_estimated", float(estimated))
                )
                tables.spectra.append(SpectrumBlock(s, it.layer, it.factor, eig))
