"""`SpectraWorker`: computes factor spectra on a thread (or inline) and merges in step order.

With a thread, the training thread only copies the factors to decompose; the worker helps
only where a CPU is really idle (on a machine whose other cores are busy it competes with
the training thread for a core; see ``benchmarks/RESULTS.md``, "Recorder overhead").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch


def auto_workers() -> int:
    """What ``workers="auto"`` means here: 1 when this process may run on more CPUs than
    torch's intra-op threads use (``len(os.sched_getaffinity(0)) > torch.get_num_threads()``,
    ``os.cpu_count()`` where affinity is unknown), else 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - systems other than Linux
        cpus = os.cpu_count() or 1
    return 1 if cpus > torch.get_num_threads() else 0


class Pending(NamedTuple):
    """A submitted job and the future of its results."""

    job: Any
    future: Future


class SpectraWorker:
    """Runs ``compute(job)`` on ``threads`` threads (0: inline) and hands each job's results
    to ``merge(job, results)`` on the training thread, in submission order.

    At most ``threads + 1`` jobs are in flight: a submission waits when the thread falls
    that far behind (a worker that cannot keep up must not pile up factor copies).
    """

    def __init__(
        self,
        threads: int,
        compute: Callable[[Any], list],
        merge: Callable[[Any, list], None],
    ) -> None:
        self.threads = threads
        self._compute = compute
        self._merge = merge
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Pending] = []

    def submit(self, job: Any, decomposes: bool) -> None:
        """Run ``job`` now or on the thread; ``decomposes``: whether it has work to do."""
        if not decomposes:
            if self._pending:  # merge after the jobs before it (they hold the spectra reused)
                done: Future = Future()
                done.set_result([])
                self._pending.append(Pending(job, done))
            else:
                self._merge(job, [])
            return
        if not self.threads:
            self._merge(job, self._compute(job))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="recorder")
        while self.in_flight() > self.threads:
            self._pending[0].future.result()
            self.drain(wait=False)
        self._pending.append(Pending(job, self._pool.submit(self._compute, job)))

    def in_flight(self) -> int:
        """Jobs submitted whose results are not computed yet."""
        return sum(not p.future.done() for p in self._pending)

    def drain(self, wait: bool) -> None:
        """Merge finished jobs in submission order (all of them when ``wait``)."""
        while self._pending and (wait or self._pending[0].future.done()):
            job, fut = self._pending.pop(0)
            self._merge(job, fut.result())

    def close(self) -> None:
        """Merge what is pending and stop the thread."""
        self.drain(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
