"""Unit tests of diagnostics.record.metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics.record import metrics as M
from singd.views import FactorView


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


def test_root_factor_with_known_singular_values_gives_their_squares_and_condition():
    k = _with_singular_values([4.0, 2.0, 1.0, 0.5]).float()
    summ = M.summarize_factor(FactorView(k, "root", "dense"))
    assert summ.eigenvalues == pytest.approx([16.0, 4.0, 1.0, 0.25], rel=1e-5)
    assert summ.metrics["sv_max"] == pytest.approx(4.0, rel=1e-5)
    assert summ.metrics["sv_min"] == pytest.approx(0.5, rel=1e-5)
    assert summ.metrics["eig_max"] == pytest.approx(16.0, rel=1e-5)
    assert summ.metrics["eig_min"] == pytest.approx(0.25, rel=1e-5)
    assert summ.metrics["cond"] == pytest.approx(64.0, rel=1e-5)
    assert summ.metrics["trace"] == pytest.approx(16 + 4 + 1 + 0.25, rel=1e-5)
    assert summ.metrics["norm_fro"] == pytest.approx(math.sqrt(21.25), rel=1e-5)
    assert not summ.estimated


def test_bfloat16_factor_is_upcast_and_left_untouched():
    k = _with_singular_values([3.0, 1.0, 0.5]).to(torch.bfloat16)
    before = k.clone()
    summ = M.summarize_factor(FactorView(k, "root", "dense"))
    assert torch.equal(k, before) and k.dtype == torch.bfloat16
    expected = torch.linalg.svdvals(k.double()) ** 2
    # well conditioned (cond 36): decomposed in float32, good to about 3e-8 * cond
    assert summ.eigenvalues == pytest.approx(expected.tolist(), rel=1e-5)
    exact = M.summarize_factor(FactorView(k, "root", "dense"), compute_dtype=torch.float64)
    assert exact.eigenvalues == pytest.approx(expected.tolist(), rel=1e-9)


def test_well_conditioned_float32_factor_is_decomposed_in_float32():
    k = _with_singular_values([2.0, 1.5, 1.0, 0.7], seed=3).float()
    summ = M.summarize_matrix(k, "root")
    exact = (torch.linalg.svdvals(k.double()) ** 2).numpy()
    rel = abs(summ.eigenvalues - exact) / exact
    assert rel.max() < 3e-7 * summ.metrics["cond"]  # the documented float32 accuracy
    assert rel.max() > 1e-12  # float32 rounding shows: float64 would be exact to ~1e-16


def test_ill_conditioned_float32_factor_is_redone_in_float64():
    # cond(K K^T) = 1e8 > FLOAT32_MAX_COND: float32 alone would get eig_min badly wrong
    k = _with_singular_values([1.0, 0.3, 1e-2, 1e-4], seed=4).float()
    exact = torch.linalg.svdvals(k.double()) ** 2
    for summ in (M.summarize_matrix(k, "root"), M.summarize_factors([(k, "root", "dense")])[0]):
        assert summ.metrics["cond"] > M.FLOAT32_MAX_COND
        assert summ.eigenvalues == pytest.approx(exact.tolist(), rel=1e-8)
        assert summ.metrics["eig_min"] == pytest.approx(1e-8, rel=1e-4)
    ((eig, estimated),) = M.factor_spectra([(k, "root", "dense")])
    assert eig == pytest.approx(exact.tolist(), rel=1e-8) and not estimated


def test_symmetric_factor_gives_its_eigenvalues():
    q = _orthogonal(3, 5)
    a = q @ torch.diag(torch.tensor([5.0, 2.0, 0.1], dtype=torch.float64)) @ q.T
    summ = M.summarize_matrix(a, "symmetric")
    assert summ.eigenvalues == pytest.approx([5.0, 2.0, 0.1], rel=1e-9)
    assert summ.metrics["cond"] == pytest.approx(50.0, rel=1e-9)
    assert summ.metrics["trace"] == pytest.approx(7.1, rel=1e-9)
    assert "sv_max" not in summ.metrics


def test_singular_symmetric_factor_has_infinite_condition():
    summ = M.summarize_matrix(torch.diag(torch.tensor([1.0, 0.0])), "symmetric")
    assert summ.metrics["cond"] == math.inf


def test_diagonal_factor_spectrum_is_sorted_squares():
    k = torch.diag(torch.tensor([0.5, -3.0, 2.0]))
    summ = M.summarize_factor(FactorView(k, "root", "diagonal"))
    assert summ.eigenvalues.tolist() == pytest.approx([9.0, 4.0, 0.25])
    assert summ.metrics["cond"] == pytest.approx(36.0)


def test_momentum_factor_gets_norms_only():
    m = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    summ = M.summarize_matrix(m, "momentum")
    assert summ.metrics == {"norm_fro": pytest.approx(5.0), "norm_max": pytest.approx(4.0)}
    assert summ.eigenvalues.size == 0


def test_large_factor_gets_a_flagged_estimate_of_the_extremes():
    s = [3.0] + [1.5] * 10 + [0.5]
    k = _with_singular_values(s, seed=3)
    summ = M.summarize_matrix(k, "root", max_dim=8, power_iters=200)
    assert summ.estimated
    assert summ.eigenvalues.size == 2
    assert summ.metrics["eig_max"] == pytest.approx(9.0, rel=1e-6)
    assert summ.metrics["eig_min"] == pytest.approx(0.25, rel=1e-3)
    assert summ.metrics["cond"] == pytest.approx(36.0, rel=1e-3)


def test_nonfinite_factor_gives_nan_metrics_and_no_spectrum():
    k = torch.eye(3)
    k[1, 2] = float("nan")
    summ = M.summarize_matrix(k, "root")
    assert summ.eigenvalues.size == 0
    assert math.isnan(summ.metrics["cond"]) and math.isnan(summ.metrics["trace"])


def test_spectrum_off_keeps_only_cheap_metrics():
    summ = M.summarize_matrix(2 * torch.eye(3), "root", spectrum=False)
    assert set(summ.metrics) == {"trace", "norm_fro"}
    assert summ.metrics["trace"] == pytest.approx(12.0)


def test_bad_role_is_refused_with_the_valid_values():
    with pytest.raises(ValueError, match="'root', 'symmetric' or 'momentum'"):
        M.summarize_matrix(torch.eye(2), "inverse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_counts_of_a_tensor_with_known_nan_and_inf(dtype):
    t = torch.zeros(4, 5, dtype=dtype)
    t[0, 0] = t[1, 1] = t[2, 2] = float("nan")
    t[0, 1] = t[3, 3] = float("inf")
    t[0, 2] = float("-inf")
    t[3, 4] = -7.5
    c = M.nonfinite_counts(t)
    assert (c.nan, c.posinf, c.neginf, c.total, c.numel) == (3, 2, 1, 6, 20)
    assert c.finite_absmax == 7.5


def test_nonfinite_counts_of_integer_and_empty_tensors_are_zero():
    assert M.nonfinite_counts(torch.arange(4)).total == 0
    assert M.nonfinite_counts(torch.zeros(0)).total == 0


def test_all_finite_flags_one_bad_entry_among_many_tensors():
    ts = [torch.ones(3), torch.ones(2, 2, dtype=torch.float16)]
    assert bool(M.all_finite(ts))
    ts[1][0, 1] = float("inf")
    assert not bool(M.all_finite(ts))


def test_tensor_bytes_of_tensors_and_structured_matrices():
    assert M.tensor_bytes(torch.zeros(10, 10)) == 400
    assert M.tensor_bytes(torch.zeros(10, 10, dtype=torch.bfloat16)) == 200

    class Fake:
        dtype = torch.float64

        def numel(self) -> int:
            return 7

    assert M.tensor_bytes(Fake()) == 56
    with pytest.raises(TypeError):
        M.tensor_bytes([1, 2])


def test_state_bytes_of_adamw_state_count_tensors_by_key():
    p = torch.nn.Parameter(torch.zeros(6, 5))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones_like(p)
    opt.step()
    got = M.state_bytes_by_key(opt.state[p])
    assert got == {"exp_avg": 120, "exp_avg_sq": 120}  # the 0-d step counter is not state bytes


def test_second_moment_summary_known_values():
    got = M.second_moment_summary(torch.tensor([1.0, 4.0, 16.0]), eps=0.0)
    assert got == {"min": 1.0, "max": 16.0, "mean": 7.0, "cond": 4.0}
    got = M.second_moment_summary(torch.tensor([0.0, 4.0]), eps=1.0)
    assert got["cond"] == pytest.approx(3.0)


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
    summs = M.summarize_factors([(m, "root", m.name) for m in mats])
    for m, summ in zip(mats, summs):
        ref = M.summarize_matrix(m.to_dense(), "root", "dense")
        assert summ.eigenvalues == pytest.approx(ref.eigenvalues.tolist(), rel=1e-9, abs=1e-12)
        assert summ.metrics["trace"] == pytest.approx(ref.metrics["trace"], rel=1e-12)
        assert summ.metrics["cond"] == pytest.approx(ref.metrics["cond"], rel=1e-9)


def test_batched_summaries_equal_one_by_one_and_leave_inputs_untouched():
    ks = [
        _with_singular_values(s, seed=i).float() for i, s in enumerate([[4.0, 1, 0.5], [2.0, 2, 1]])
    ]
    sym = _orthogonal(3, 9) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    sym = sym @ _orthogonal(3, 9).T
    items = [(ks[0], "root", "dense"), (sym, "symmetric", "dense"), (ks[1], "root", "dense")]
    before = [k.clone() for k in ks]
    batched = M.summarize_factors(items)
    for (m, role, st), b in zip(items, batched):
        one = M.summarize_matrix(m, role, st)
        assert b.eigenvalues == pytest.approx(one.eigenvalues.tolist(), rel=1e-12)
    assert batched[0].eigenvalues == pytest.approx([16.0, 1.0, 0.25], rel=1e-5)
    assert batched[1].eigenvalues == pytest.approx([3.0, 2.0, 1.0], rel=1e-9)
    assert all(torch.equal(k, b) for k, b in zip(ks, before))


def test_factor_parts_reads_stored_tensors_without_a_dense_copy():
    from singd.structures import structure

    d = structure("diagonal").from_dense(torch.diag(torch.tensor([1.0, -2.0])))
    kind, parts = M.factor_parts(d)
    assert kind == "diagonal" and parts[0].data_ptr() == d.diag.data_ptr()
    b = structure("block2diagonal").from_dense(torch.eye(5))
    kind, parts = M.factor_parts(b)
    assert kind == "blocks" and [tuple(p.shape) for p in parts] == [(2, 2, 2), (1, 1)]
    with pytest.raises(TypeError, match="structured matrix"):
        M.factor_parts([[1.0]])
