"""Tests of the recorder's parts: the change cache, the spectra worker, the quantities' records."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from diagnostics.record.cache import ChangeCache, stamp
from diagnostics.record.quantities import MemoryRow, MetricRow
from diagnostics.record.recording import COLUMNS
from diagnostics.record.worker import SpectraWorker


class _Matrix:
    """A stand-in for a structured matrix (weakly referenceable, one stored tensor)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


def test_change_cache_hits_only_while_the_factor_is_the_same_object_and_version():
    cache = ChangeCache()
    m = _Matrix(torch.eye(2))
    cache.put("K", stamp(m, [m.t]), "value")
    assert cache.get("K", m, stamp(m, [m.t])).value == "value"
    m.t.mul_(2.0)  # in place: the version counter moves
    assert cache.get("K", m, stamp(m, [m.t])) is None
    cache.put("K", stamp(m, [m.t]), "again")
    other = _Matrix(m.t)  # same storage and version, another object
    assert cache.get("K", other, stamp(other, [other.t])) is None
    cache.drop("K")
    assert cache.get("K", m, stamp(m, [m.t])) is None


def test_change_cache_forgets_factors_that_cannot_be_stamped():
    cache = ChangeCache()
    t = torch.eye(2)
    assert stamp(1.5, [t]) is None  # a float cannot be referenced weakly
    assert cache.put("K", None, "value") is None
    assert cache.get("K", 1.5, None) is None


@pytest.mark.parametrize("threads", [0, 1])
def test_worker_merges_in_submission_order_with_at_most_threads_plus_one_in_flight(threads):
    merged: list[tuple[int, list]] = []
    in_flight: list[int] = []
    gate = threading.Event()

    def compute(job: int) -> list:
        if job == 0:
            gate.wait(1.0)  # the first job is slow: the others wait behind it
        time.sleep(0.001)
        return [job * 10]

    worker = SpectraWorker(threads, compute, lambda job, res: merged.append((job, res)))
    for job in range(4):
        worker.submit(job, decomposes=job != 2)  # job 2 has nothing to compute
        in_flight.append(worker.in_flight())
        if job == 1:
            gate.set()
    worker.close()
    assert merged == [(0, [0]), (1, [10]), (2, []), (3, [30])]
    assert max(in_flight) <= threads + 1


def test_row_tuples_have_their_frames_columns():
    assert list(MetricRow._fields) == list(COLUMNS["metrics"])
    assert list(MemoryRow._fields) == list(COLUMNS["memory"])
