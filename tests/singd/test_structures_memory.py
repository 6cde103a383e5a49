"""Sparse structures never allocate a d x d intermediate (torch.profiler memory events)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from singd.structures import structure

D = 4096
N_ROWS = 64


def largest_allocation(fn) -> int:
    """Bytes of the largest allocation made while running ``fn`` (profiler, CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_detector_sees_a_dense_allocation():
    S = structure("diagonal").eye(D)
    assert largest_allocation(S.to_dense) >= D * D * 4


@pytest.mark.parametrize(
    "name",
    [
        "diagonal",
        "block30diagonal",
        "block64diagonal",
        "hierarchical15_15",
        "triltoeplitz",
        "triutoeplitz",
        "triltopleftdiag",
        "trilbottomrightdiag",
        "triutopleftdiag",
        "triubottomrightdiag",
    ],
)
def test_no_operation_allocates_d_by_d(name):
    gen = torch.Generator().manual_seed(0)
    cls = structure(name)
    S = cls.eye(D)
    for t in S._tensors():
        t.normal_(generator=gen)
    T = S.clone()
    X = torch.randn(D, N_ROWS, generator=gen)
    ops = {
        "from_inner(X)": lambda: S.from_inner(X),
        "from_inner()": lambda: S.from_inner(),
        "S @ T": lambda: S @ T,
        "S @ X": lambda: S @ X,
        "rmatmat": lambda: S.rmatmat(X),
        "X^T @ S": lambda: X.T @ S,
        "add_/mul_/diag_add_": lambda: S.clone().add_(T, alpha=0.5).mul_(2).diag_add_(1.0),
        "norms": lambda: (S.trace(), S.infinity_vector_norm()),
    }
    limit = D * D * 4  # bytes of one d x d float32 tensor
    for op, fn in ops.items():
        peak = largest_allocation(fn)
        assert 0 < peak < limit, f"{name} {op}: an allocation of {peak} bytes (d*d*4 = {limit})"
