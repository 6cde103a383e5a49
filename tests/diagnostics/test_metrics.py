"""Unit tests of diagnostics.record.metrics (the quantities' math) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diagnostics.record import metrics as M


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _with_singular_values(s: list[float], seed: int = 0) -> torch.Tensor:
    n = len(s)
    return (
        _orthogonal(n, seed)
        @ torch.diag(torch.tensor(s, dtype=torch.float64))
        @ _orthogonal(n, seed + 1)
    )


def _spectrum(matrix, role, structure="dense", **kw):
    """(eigenvalues, spectral metrics, estimated) of one factor, as the recorder computes them."""
    kind, parts = M.spectral_parts(matrix, role, structure)
    dim = int(matrix.shape[0]) if isinstance(matrix, torch.Tensor) else int(matrix.dim)
    ((eig, estimated),) = M.parts_spectra([(role, kind, parts, dim)], **kw)
    return eig, M.spectral_metrics(eig, role), estimated


def test_root_factor_with_known_singular_values_gives_their_squares_and_condition():
    k = _with_singular_values([4.0, 2.0, 1.0, 0.5]).float()
    eig, metrics, estimated = _spectrum(k, "root")
    assert eig == pytest.approx([16.0, 4.0, 1.0, 0.25], rel=1e-5)
    assert metrics["sv_max"] == pytest.approx(4.0, rel=1e-5)
    assert metrics["sv_min"] == pytest.approx(0.5, rel=1e-5)
    assert metrics["eig_max"] == pytest.approx(16.0, rel=1e-5)
    assert metrics["eig_min"] == pytest.approx(0.25, rel=1e-5)
    assert metrics["cond"] == pytest.approx(64.0, rel=1e-5)
    assert not estimated


def test_bfloat16_factor_is_upcast_and_left_untouched():
    k = _with_singular_values([3.0, 1.0, 0.5]).to(torch.bfloat16)
    before = k.clone()
    eig, _, _ = _spectrum(k, "root")
    assert torch.equal(k, before) and k.dtype == torch.bfloat16
    expected = torch.linalg.svdvals(k.double()) ** 2
    # well conditioned (cond 36): decomposed in float32, good to about 3e-8 * cond
    assert eig == pytest.approx(expected.tolist(), rel=1e-5)
    exact, _, _ = _spectrum(k, "root", compute_dtype=torch.float64)
    assert exact == pytest.approx(expected.tolist(), rel=1e-9)


def test_well_conditioned_float32_factor_is_decomposed_in_float32():
    k = _with_singular_values([2.0, 1.5, 1.0, 0.7], seed=3).float()
    eig, metrics, _ = _spectrum(k, "root")
    exact = (torch.linalg.svdvals(k.double()) ** 2).numpy()
    rel = abs(eig - exact) / exact
    assert rel.max() < 3e-7 * metrics["cond"]  # the documented float32 accuracy
    assert rel.max() > 1e-12  # float32 rounding shows: float64 would be exact to ~1e-16


def test_ill_conditioned_float32_factor_is_redone_in_float64():
    # cond(K K^T) = 1e8 > FLOAT32_MAX_COND: float32 alone would get eig_min badly wrong
    k = _with_singular_values([1.0, 0.3, 1e-2, 1e-4], seed=4).float()
    exact = torch.linalg.svdvals(k.double()) ** 2
    eig, metrics, estimated = _spectrum(k, "root")
    assert metrics["cond"] > M.FLOAT32_MAX_COND
    assert eig == pytest.approx(exact.tolist(), rel=1e-8) and not estimated
    assert metrics["eig_min"] == pytest.approx(1e-8, rel=1e-4)


def test_symmetric_factor_gives_its_eigenvalues():
    q = _orthogonal(3, 5)
    a = q @ torch.diag(torch.tensor([5.0, 2.0, 0.1], dtype=torch.float64)) @ q.T
    eig, metrics, _ = _spectrum(a, "symmetric")
    assert eig == pytest.approx([5.0, 2.0, 0.1], rel=1e-9)
    assert metrics["cond"] == pytest.approx(50.0, rel=1e-9)
    assert "sv_max" not in metrics
    assert float(M.diag_sum(a, "dense")) == pytest.approx(7.1, rel=1e-9)  # its trace


def test_singular_symmetric_factor_has_infinite_condition():
    _, metrics, _ = _spectrum(torch.diag(torch.tensor([1.0, 0.0])), "symmetric")
    assert metrics["cond"] == math.inf


def test_diagonal_factor_spectrum_is_sorted_squares():
    k = torch.diag(torch.tensor([0.5, -3.0, 2.0]))
    eig, metrics, _ = _spectrum(k, "root", "diagonal")
    assert eig.tolist() == pytest.approx([9.0, 4.0, 0.25])
    assert metrics["cond"] == pytest.approx(36.0)


def test_large_factor_gets_a_flagged_estimate_of_the_extremes():
    s = [3.0] + [1.5] * 10 + [0.5]
    k = _with_singular_values(s, seed=3)
    eig, metrics, estimated = _spectrum(k, "root", max_dim=8, power_iters=200)
    assert estimated
    assert eig.size == 2
    assert metrics["eig_max"] == pytest.approx(9.0, rel=1e-6)
    assert metrics["eig_min"] == pytest.approx(0.25, rel=1e-3)
    assert metrics["cond"] == pytest.approx(36.0, rel=1e-3)


def test_empty_spectrum_gives_nan_metrics():
    metrics = M.spectral_metrics(np.zeros(0), "root")
    assert set(metrics) == {"eig_min", "eig_max", "cond", "sv_min", "sv_max"}
    assert all(math.isnan(v) for v in metrics.values())


def test_bad_role_is_refused_with_the_valid_values():
    with pytest.raises(ValueError, match="'root', 'symmetric' or 'momentum'"):
        M.spectral_parts(torch.eye(2), "inverse", "dense")
    with pytest.raises(ValueError, match="not 'momentum'"):
        M.parts_spectra([("momentum", "dense", [torch.eye(2)], 2)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_count_vector_of_a_tensor_with_known_nan_and_inf(dtype):
    t = torch.zeros(4, 5, dtype=dtype)
    t[0, 0] = t[1, 1] = t[2, 2] = float("nan")
    t[0, 1] = t[3, 3] = float("inf")
    t[0, 2] = float("-inf")
    t[3, 4] = -7.5
    assert M.count_vector(t).tolist() == [3.0, 2.0, 1.0, 7.5]


def test_count_vector_of_integer_and_empty_tensors_is_zero():
    assert M.count_vector(torch.arange(4)).tolist() == [0.0] * 4
    assert M.count_vector(torch.zeros(0)).tolist() == [0.0] * 4


def test_state_bytes_of_adamw_state_count_tensors_by_key():
    p = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    got = M.state_bytes_by_key(opt.state[p])
    assert got == {"exp_avg": 60, "exp_avg_sq": 60}  # the 0-d step counter is not state bytes


def test_second_moment_summary_known_values():
    items = [(torch.tensor([1.0, 4.0, 16.0]), 0.0), (torch.tensor([0.0, 4.0]), 1.0)]
    first, second = M.second_moment_summaries(items)
    assert first == {"min": 1.0, "max": 16.0, "mean": 7.0, "cond": 4.0}
    assert second["cond"] == pytest.approx(3.0)


def test_peak_rss_is_read_and_reset_fails_gracefully_without_permission(monkeypatch, tmp_path):
    peak = M.read_peak_rss()
    assert peak is None or peak > 0
    monkeypatch.setattr(M, "_CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    assert M.reset_peak_rss() is False
    monkeypatch.setattr(M, "_STATUS", str(tmp_path / "missing" / "status"))
    assert M.read_peak_rss() is None


def test_peak_rss_reset_lowers_the_high_water_mark_after_a_freed_allocation():
    if M.read_peak_rss() is None or not M.reset_peak_rss():
        pytest.skip("VmHWM or /proc/self/clear_refs not available here")
    big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    high = M.read_peak_rss()
    del big
    M.reset_peak_rss()
    assert M.read_peak_rss() < high


def test_structured_factors_give_the_spectrum_of_their_dense_form():
    from singd.structures import structure

    g = torch.Generator().manual_seed(7)
    dense = torch.randn(7, 7, generator=g, dtype=torch.float64) + 3 * torch.eye(7)
    mats = [structure(n).from_dense(dense) for n in ("dense", "diagonal", "block3diagonal", "tril")]
    items = []
    for m in mats:
        kind, parts = M.spectral_parts(m, "root", m.name)
        items.append(("root", kind, parts, m.dim))
    for m, (eig, _) in zip(mats, M.parts_spectra(items)):
        ref, _, _ = _spectrum(m.to_dense(), "root")
        assert eig == pytest.approx(ref.tolist(), rel=1e-9, abs=1e-12)


def test_batched_spectra_equal_one_by_one_and_leave_inputs_untouched():
    ks = [
        _with_singular_values(s, seed=i).float() for i, s in enumerate([[4.0, 1, 0.5], [2.0, 2, 1]])
    ]
    sym = _orthogonal(3, 9) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    sym = sym @ _orthogonal(3, 9).T
    factors = [(ks[0], "root"), (sym, "symmetric"), (ks[1], "root")]
    before = [k.clone() for k in ks]
    items = [(role, *M.spectral_parts(m, role, "dense"), 3) for m, role in factors]
    batched = M.parts_spectra(items)
    for (m, role), (eig, _) in zip(factors, batched):
        one, _, _ = _spectrum(m, role)
        assert eig == pytest.approx(one.tolist(), rel=1e-12)
    assert batched[0][0] == pytest.approx([16.0, 1.0, 0.25], rel=1e-5)
    assert batched[1][0] == pytest.approx([3.0, 2.0, 1.0], rel=1e-9)
    assert all(torch.equal(k, b) for k, b in zip(ks, before))


def test_spectral_parts_reads_stored_tensors_without_a_dense_copy():
    from singd.structures import structure

    d = structure("diagonal").from_dense(torch.diag(torch.tensor([1.0, -2.0])))
    kind, parts = M.spectral_parts(d, "root", "diagonal")
    assert kind == "diagonal" and parts[0].data_ptr() == d.diag.data_ptr()
    b = structure("block2diagonal").from_dense(torch.eye(5))
    kind, parts = M.spectral_parts(b, "root", "block2diagonal")
    assert kind == "blocks" and [tuple(p.shape) for p in parts] == [(2, 2, 2), (1, 1)]
    kind, _ = M.spectral_parts(torch.eye(2), "root", "diagonal")
    assert kind == "dense-diagonal"  # a dense tensor said to be diagonal: its diagonal is used
    with pytest.raises(TypeError, match="structured matrix"):
        M.spectral_parts([[1.0]], "root", "dense")
