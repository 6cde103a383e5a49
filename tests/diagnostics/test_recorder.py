"""Tests of diagnostics.Recorder: schedule, norms, factors, events, memory, no side effects."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics import Recorder
from diagnostics.record import metrics as M
from diagnostics.record.quantities.base import MODEL
from diagnostics.record.recorder import make_schedule
from singd.views import FactorView, LayerFactors


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, opt, rec, steps, *, before_step=None, scaler=None):
    x, y = _data()
    for i in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            if before_step is not None:
                before_step(i)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if before_step is not None:
                before_step(i)
            opt.step()
        if rec is not None:
            rec.step(loss=loss)
    return model


class FakeFactorOptimizer(torch.optim.SGD):
    """SGD that also offers the SINGD view (dense factors with known spectra, known bytes)."""

    def __init__(self, params, k: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__(params, lr=0.1)
        self.k, self.c = k, c

    def preconditioner_factors(self) -> dict[str, LayerFactors]:
        return {
            "0": LayerFactors(
                "0",
                "Linear",
                {
                    "K": FactorView(self.k, "root", "dense"),
                    "C": FactorView(self.c, "root", "diagonal"),
                    "m_K": FactorView(torch.zeros_like(self.k), "momentum", "dense"),
                },
            )
        }

    def state_bytes(self) -> dict[str, dict[str, int]]:
        return {"0": {"K": self.k.numel() * 4, "C": 12, "momentum": 100}}


# ---------------------------------------------------------------------------- schedule


def test_schedule_every_n_list_and_callable():
    assert [s for s in range(10) if make_schedule(3)(s)] == [0, 3, 6, 9]
    assert [s for s in range(10) if make_schedule([1, 4])(s)] == [1, 4]
    assert [s for s in range(10) if make_schedule(lambda s: s > 7)(s)] == [8, 9]


@pytest.mark.parametrize("bad", [0, -2, True, "10", [1, -1], 2.5])
def test_bad_schedule_is_refused(bad):
    with pytest.raises((TypeError, ValueError), match="every"):
        make_schedule(bad)


def test_recorded_steps_follow_the_schedule():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=[0, 2, 3])
    _train(model, opt, rec, 5)
    st = rec.recording.steps
    assert st["step"].tolist() == [0, 1, 2, 3, 4]
    assert st["recorded"].tolist() == [True, False, True, True, False]
    assert sorted(set(rec.recording.metrics["step"])) == [0, 2, 3]


def test_bad_arguments_are_refused_with_clear_errors():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer"):
        Recorder(model, model)
    with pytest.raises(ValueError, match="check_finite"):
        Recorder(opt, model, check_finite="sometimes")
    with pytest.raises(TypeError, match="scaler"):
        Recorder(opt, model, scaler=object())
    with pytest.raises(ValueError, match="workers"):
        Recorder(opt, model, workers=-1)
    rec = Recorder(opt, model)
    with pytest.raises(ValueError, match="scalar"):
        rec.step(loss=torch.ones(3))


# ---------------------------------------------------------------------------- per-step scalars


@pytest.mark.parametrize("step_norms", [True, "grad", False])
def test_grad_update_norms_and_lr_match_hand_computation_for_adamw(step_norms):
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = Recorder(opt, model, every=2, step_norms=step_norms)
    x, y = _data()
    expected = {}
    for i in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        gn = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
        un = torch.sqrt(
            sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(model.parameters(), before))
        )
        expected[i] = (loss.item(), float(gn), float(un))
        rec.step(loss=loss)
    st = rec.recording.steps.set_index("step")
    for s in (0, 2):
        loss, gn, un = expected[s]
        assert st.loc[s, "loss"] == pytest.approx(loss, rel=1e-6)
        assert st.loc[s, "grad_norm"] == pytest.approx(gn, rel=1e-5)
        assert st.loc[s, "update_norm"] == pytest.approx(un, rel=1e-5)
        assert st.loc[s, "lr"] == 0.01
    if step_norms:  # unrecorded steps get the total norms too
        assert st.loc[1, "grad_norm"] == pytest.approx(expected[1][1], rel=1e-5)
        if step_norms is True:
            assert st.loc[1, "update_norm"] == pytest.approx(expected[1][2], rel=1e-5)
        else:
            assert math.isnan(st.loc[1, "update_norm"])
    else:
        assert math.isnan(st.loc[1, "grad_norm"]) and math.isnan(st.loc[1, "update_norm"])
    assert math.isnan(st.loc[1, "param_norm"])  # the parameter norm only on recorded steps
    assert st.loc[1, "loss"] == pytest.approx(expected[1][0], rel=1e-6)
    m = rec.recording.metrics
    layer0 = m[(m.step == 0) & (m.layer == "0") & (m.factor == "grad")]["value"].item()
    w, b = model[0].weight, model[0].bias
    assert layer0 > 0 and math.isfinite(layer0)
    assert set(m[m.step == 0]["factor"]) >= {"grad", "param", "update", "optimizer"}
    assert {"weight.exp_avg_sq", "bias.exp_avg"} <= set(m[m.layer == "0"]["factor"])
    assert w.grad is not None and b.grad is not None


def test_adamw_state_bytes_per_layer_and_key():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 1)
    mem = rec.recording.memory
    opt_rows = mem[mem.layer != "(process)"]
    got = {(r.layer, r.component): r.bytes for r in opt_rows.itertuples()}
    assert got == {
        ("0", "exp_avg"): (30 + 5) * 4,
        ("0", "exp_avg_sq"): (30 + 5) * 4,
        ("2", "exp_avg"): (15 + 3) * 4,
        ("2", "exp_avg_sq"): (15 + 3) * 4,
    }
    assert (mem[mem.layer == "(process)"]["bytes"] > 0).all()


def test_second_moment_statistics_for_adamw():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 1)
    v = opt.state[model[0].weight]["exp_avg_sq"]
    m = rec.recording.metric("max", layer="0", factor="weight.exp_avg_sq")
    assert m["value"].item() == pytest.approx(float(v.max()), rel=1e-6)


def test_extra_scalars_and_log_become_step_columns():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model)
    _train(model, opt, rec, 2)
    rec.log(test_accuracy=0.75)
    rec.log(step=0, test_accuracy=0.5)
    st = rec.recording.steps
    assert st["test_accuracy"].tolist() == [0.5, 0.75]
    with pytest.raises(ValueError, match="built-in"):
        rec.log(loss=1.0)


def test_listeners_hear_each_recorded_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    heard = []
    with Recorder(opt, model, every=2) as rec:
        rec.add_listener(lambda r, s: heard.append((s, len(r.recording.steps))))
        _train(model, opt, rec, 5)
    assert heard == [(0, 1), (2, 3), (4, 5), (4, 5)]  # the last call comes from close()
    assert rec.closed
    with pytest.raises(RuntimeError, match="closed"):
        rec.step(loss=1.0)


# ---------------------------------------------------------------------------- factors


def test_factor_view_optimizer_gives_known_spectra_metrics_and_state_bytes():
    model = _mlp()
    k = torch.diag(torch.tensor([2.0, 1.0, 0.5]))  # singular values 2, 1, .5
    c = torch.diag(torch.tensor([3.0, 1.0]))
    opt = FakeFactorOptimizer(model.parameters(), k, c)
    rec = Recorder(opt, model, every=1, budget=None)
    _train(model, opt, rec, 1)
    r = rec.recording
    assert r.metric("cond", "0", "K")["value"].item() == pytest.approx(16.0)
    assert r.metric("sv_min", "0", "K")["value"].item() == pytest.approx(0.5)
    assert r.metric("trace", "0", "C")["value"].item() == pytest.approx(10.0)
    assert r.metric("norm_fro", "0", "m_K")["value"].item() == 0.0
    sp = r.spectra[(r.spectra.layer == "0") & (r.spectra.factor == "K")]
    assert sp["value"].tolist() == pytest.approx([4.0, 1.0, 0.25])
    assert sp["index"].tolist() == [0, 1, 2]
    mem = r.memory[r.memory.layer == "0"]
    assert dict(zip(mem.component, mem.bytes)) == {"K": 36, "C": 12, "momentum": 100}
    # the generic optimizer.state (SGD momentum buffers) is not read when the view exists
    assert not any("momentum_buffer" in f for f in r.metrics.factor)


def test_spectra_off_skips_eigenvalues():
    model = _mlp()
    opt = FakeFactorOptimizer(model.parameters(), torch.eye(3), torch.eye(2))
    rec = Recorder(opt, model, every=1, spectra=False)
    _train(model, opt, rec, 1)
    assert len(rec.recording.spectra) == 0
    assert len(rec.recording.metric("trace", "0", "K")) == 1
    assert len(rec.recording.metric("cond")) == 0


def test_worker_thread_gives_the_same_factor_metrics():
    def run(workers: int):
        model = _mlp()
        k = torch.tensor([[2.0, 0.3, 0.0], [0.1, 1.0, 0.2], [0.0, 0.0, 0.5]])
        opt = FakeFactorOptimizer(model.parameters(), k, torch.eye(2))
        rec = Recorder(opt, model, every=1, workers=workers)
        _train(model, opt, rec, 3)
        rec.close()
        return rec.recording

    a, b = run(0), run(1)
    cols = ["step", "layer", "factor", "metric", "value"]
    assert a.spectra.equals(b.spectra)
    sa = a.metrics[cols].sort_values(cols[:4]).reset_index(drop=True)
    sb = b.metrics[cols].sort_values(cols[:4]).reset_index(drop=True)
    assert sa.drop(columns="value").equals(sb.drop(columns="value"))
    same = (sa["value"] == sb["value"]) | (sa["value"].isna() & sb["value"].isna())
    assert same[sa["factor"].isin(["K", "C", "m_K"])].all()


# ---------------------------------------------------------------------------- events


def _event_keys(rec):
    ev = rec.recording.events
    return sorted(
        (r.step, r.phase, r.layer, r.tensor, r.n_nan, r.n_posinf, r.n_neginf)
        for r in ev.itertuples()
    )


@pytest.mark.parametrize("step", [0, 1], ids=["recorded", "unrecorded"])
def test_nan_in_a_gradient_gives_exactly_the_gradient_and_parameter_events(step):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=[0], check_finite="grads")

    def inject(i):
        if i == step:
            model[2].weight.grad[1, 3] = float("nan")

    _train(model, opt, rec, step + 1, before_step=inject)  # later steps would be all NaN
    assert _event_keys(rec) == [
        (step, "backward", "2", "weight.grad", 1, 0, 0),
        (step, "parameter update", "2", "weight", 1, 0, 0),
    ]
    ev = rec.recording.events.iloc[0]
    got = (ev["dtype"], ev["shape"], ev["numel"], bool(ev["skipped"]))
    assert got == ("float32", "(3, 5)", 15, False)
    assert ev.finite_absmax == pytest.approx(float(model[2].weight.grad.nan_to_num().abs().max()))


def test_loss_only_check_catches_a_gradient_nan_one_step_later_through_the_loss():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=[0])  # default check_finite="loss"

    def inject(i):
        if i == 1:
            model[2].weight.grad[1, 3] = float("nan")

    _train(model, opt, rec, 3, before_step=inject)
    ev = rec.recording.events
    assert 1 not in set(ev["step"])  # the loss of step 1 was still finite
    at2 = ev[ev["step"] == 2]
    assert ("forward", "(model)", "loss") in set(zip(at2.phase, at2.layer, at2.tensor))
    assert ("parameter update", "2", "weight") in set(zip(at2.phase, at2.layer, at2.tensor))
    assert rec._hooks.armed  # step 3 would be inspected with forward/backward hooks


def test_inf_in_an_activation_gives_exactly_one_forward_event():
    model = _mlp()

    def poison(module, inputs, output):  # registered before the recorder's own hooks
        out = output.clone()
        out[2, 1] = float("-inf")  # the ReLU after it maps -inf to 0: nothing else breaks
        return out

    model[0].register_forward_hook(poison)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 1)
    assert _event_keys(rec) == [(0, "forward", "0", "output", 0, 0, 1)]
    assert rec.recording.events["shape"].item() == "(8, 5)"


def test_activation_changed_in_place_later_is_checked_eagerly_from_the_next_recorded_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    poison_at = {1}

    def poison(module, inputs, output):
        if poison_at & {rec.current_step}:
            out = output.clone()
            out[2, 1] = float("-inf")  # the in-place ReLU then overwrites it with 0
            return out
        return None

    model[0].register_forward_hook(poison)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 2)  # step 0 finds out that layer 0's output changes in place
    assert _event_keys(rec) == [(1, "forward", "0", "output", 0, 0, 1)]


def test_nan_in_an_output_gradient_is_a_backward_event():
    model = _mlp()

    def poison(module, inputs, output):
        out = output * 1.0
        out.register_hook(
            lambda g: g.index_put(
                (torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))
            )
        )
        return out

    model[2].register_forward_hook(poison)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 1)
    keys = _event_keys(rec)
    assert (0, "backward", "2", "grad_output", 1, 0, 0) in keys
    assert all(k[1] != "forward" for k in keys)


def test_nonfinite_loss_is_a_forward_event_and_arms_hooks_for_the_next_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=100, check_finite="loss")
    rec.step(loss=float("nan"))  # step 0 is recorded
    rec.step(loss=torch.tensor(float("inf")))  # step 1: the cheap check trips
    ev = rec.recording.events
    assert ev[["step", "phase", "tensor"]].values.tolist() == [
        [0, "forward", "loss"],
        [1, "forward", "loss"],
    ]
    assert ev["n_posinf"].tolist() == [0, 1]
    assert rec._hooks.armed  # the next step is inspected in detail


def test_events_off_records_none():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1, events=False)
    _train(model, opt, rec, 1, before_step=lambda i: model[0].bias.grad.fill_(float("nan")))
    assert len(rec.recording.events) == 0


def test_grad_scaler_skip_is_an_event_with_scale_and_skipped_flag():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    rec = Recorder(opt, model, every=100, scaler=scaler, check_finite=False)

    def inject(i):
        if i == 1:
            model[0].bias.grad[0] = float("inf")

    _train(model, opt, rec, 3, scaler=scaler, before_step=inject)
    st = rec.recording.steps
    assert st["skipped"].tolist() == [False, True, False]
    ev = rec.recording.events
    assert ev[["step", "phase", "layer", "tensor"]].values.tolist() == [
        [1, "backward", "0", "bias.grad"]
    ]
    assert bool(ev["skipped"].item()) and ev["grad_scale"].item() == 2.0**9  # after update()


def test_max_events_caps_a_broken_run_with_a_warning():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1, max_events=3)
    with pytest.warns(RuntimeWarning, match="max_events"):
        _train(model, opt, rec, 3, before_step=lambda i: model[0].weight.grad.fill_(float("nan")))
    assert len(rec.recording.events) == 3


# ---------------------------------------------------------------------------- no side effects


@pytest.mark.parametrize("opt_name", ["adamw", "singd"])
def test_recording_does_not_change_training(opt_name):
    def make(model):
        if opt_name == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=0.01)
        from singd import SINGD

        return SINGD(model, lr=0.01, T=1)

    plain = _mlp()
    _train(plain, make(plain), None, 4)
    recorded = _mlp()
    opt = make(recorded)
    rec = Recorder(opt, recorded, every=2)
    _train(recorded, opt, rec, 4)
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)
    assert len(rec.recording.metrics) > 0


def test_singd_factors_are_recorded_and_left_untouched():
    from singd import SINGD

    model = _mlp()
    opt = SINGD(model, lr=0.01, T=1, alpha1=0.5)
    rec = Recorder(opt, model, every=2, budget=None)
    _train(model, opt, rec, 3)
    views = opt.preconditioner_factors()
    k = views["0"].factors["K"].dense()
    before = {n: v.dense() for n, v in views["0"].factors.items()}
    r = rec.recording
    # step 2's K is the one the optimizer holds now (no update at step 3 ... T=1 updates each step)
    spec = r.spectra[(r.spectra.step == 2) & (r.spectra.layer == "0") & (r.spectra.factor == "K")]
    assert len(spec) == k.shape[0] == 7  # d_K = 6 inputs + bias
    assert set(r.factors("0")) >= {"K", "C", "m_K", "m_C", "grad"}
    assert r.metric("norm_fro", "0", "m_K")["value"].notna().all()
    comps = set(r.memory[r.memory.layer == "0"]["component"])
    assert comps == {"K", "C", "m_K", "m_C", "momentum"}
    after = {n: v.dense() for n, v in opt.preconditioner_factors()["0"].factors.items()}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_singd_spectrum_equals_squared_singular_values_of_k():
    from singd import SINGD

    model = _mlp()
    opt = SINGD(model, lr=0.01, T=1)
    rec = Recorder(opt, model, every=1, budget=None)
    _train(model, opt, rec, 2)
    k = opt.preconditioner_factors()["2"].factors["K"].dense().double()
    expected = (torch.linalg.svdvals(k) ** 2).tolist()
    r = rec.recording
    got = r.spectra[(r.spectra.step == 1) & (r.spectra.layer == "2") & (r.spectra.factor == "K")]
    # float32 factors are decomposed in float32 where well conditioned (diagnostics.record.metrics)
    cond = expected[0] / expected[-1]
    assert cond < M.FLOAT32_MAX_COND
    assert got["value"].tolist() == pytest.approx(expected, rel=1e-6 * cond, abs=1e-12)


def test_kfac_factors_are_symmetric_spectra():
    from singd import KFAC

    model = _mlp()
    opt = KFAC(model)
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 2)
    r = rec.recording
    assert "sv_min" not in set(r.metrics[r.metrics.layer == "0"]["metric"])
    conds = r.metric("cond", layer="0")["value"]
    assert len(conds) > 0 and (conds >= 1.0).all()


def test_steps_without_a_loss_record_nan_and_raise_no_event():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=2)
    _train(model, opt, None, 1)
    for _ in range(3):
        rec.step()
    st = rec.recording.steps
    assert st["loss"].isna().all() and st["loss"].dtype == "float64"
    assert len(rec.recording.events) == 0
    assert not rec._hooks.armed or rec.is_recorded(rec.current_step)


def test_record_error_goes_to_its_own_table_not_to_the_nan_events(tmp_path):
    from diagnostics.record.recording import Recording
    from diagnostics.views.figures import events_figure

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1)
    rec.step(loss=1.0)
    rec.record_error(
        RuntimeError("factor A of layer (model) cannot be inverted"), layer=MODEL, tensor="A_inv"
    )
    rec.close()
    assert len(rec.recording.events) == 0
    err = rec.recording.errors
    assert len(err) == 1
    row = err.iloc[0]
    assert (row["step"], row["phase"], row["layer"], row["tensor"], row["exception"]) == (
        1, "preconditioner update", MODEL, "A_inv", "RuntimeError",
    )  # fmt: skip
    assert row["message"] == "RuntimeError: factor A of layer (model) cannot be inverted"
    assert rec.recording.summary_row()["nan_inf_events"] == 0  # an error is not a NaN/Inf
    loaded = Recording.load(rec.recording.save(tmp_path / "r.rec"))
    pd.testing.assert_frame_equal(loaded.errors, rec.recording.errors)
    fig = events_figure(loaded)
    assert [t.name for t in fig.data] == ["error (preconditioner update)"]
    assert "cannot be inverted" in str(fig.data[0].customdata[0])
    assert "NaN/Inf events (0)" in fig.layout.title.text and "errors (1)" in fig.layout.title.text
    with pytest.raises(TypeError, match="exc must be"):
        rec.record_error(42)


def test_train_records_the_kfac_inverse_failure_as_an_error_with_its_exception():
    from experiments.training import train

    options = {"factor_dtype": "bfloat16", "on_inverse_failure": "raise"}
    result = train("mlp", "kfac", steps=5, optimizer_options=options, record=True, progress=False)
    errors = result.recording.errors
    assert len(errors) == 1 and errors["phase"].iloc[0] == "preconditioner update"
    assert errors["exception"].iloc[0] == "KFACInverseError"
    assert errors["message"].iloc[0].startswith("KFACInverseError")
    assert (result.recording.events["message"] == "").all()


# ---------------------------------------------------------------------------- cost cutting


def test_auto_workers_uses_a_thread_only_when_a_cpu_is_free(monkeypatch):
    from diagnostics.record import worker as W

    monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(W.torch, "get_num_threads", lambda: 1)
    assert W.auto_workers() == 1
    monkeypatch.setattr(W.torch, "get_num_threads", lambda: 2)
    assert W.auto_workers() == 0
    model = _mlp()
    opt = FakeFactorOptimizer(model.parameters(), torch.eye(3), torch.eye(2))
    rec = Recorder(opt, model)  # workers="auto" is the default
    assert rec.workers == 0 and rec.meta["recorder"]["workers_auto"] is True
    assert Recorder(opt, model, workers=1).meta["recorder"]["workers_auto"] is False


def _count_decompositions(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = M.parts_spectra

    def counting(items, **kw):
        calls.append(len(items))
        return real(items, **kw)

    monkeypatch.setattr(M, "parts_spectra", counting)
    return calls


@pytest.mark.parametrize("workers", [0, 1])
def test_unchanged_factors_are_not_decomposed_again_but_recorded_every_step(monkeypatch, workers):
    calls = _count_decompositions(monkeypatch)
    model = _mlp()
    k = torch.tensor([[2.0, 0.3, 0.0], [0.1, 1.0, 0.2], [0.0, 0.0, 0.5]])
    exact = (torch.linalg.svdvals(k.double()) ** 2).tolist()
    opt = FakeFactorOptimizer(model.parameters(), k, torch.diag(torch.tensor([3.0, 1.0])))
    rec = Recorder(opt, model, every=1, workers=workers, budget=None)
    _train(model, opt, rec, 3)
    opt.k.mul_(2.0)  # in place: the version counter changes, so K is decomposed again
    _train(model, opt, rec, 1)
    opt.c = torch.diag(torch.tensor([5.0, 1.0]))  # a new tensor: C is decomposed again
    _train(model, opt, rec, 1)
    rec.close()
    assert calls == [2, 1, 1]  # step 0: K and C; step 3: K; step 4: C
    r = rec.recording
    for step, scale in [(0, 1), (1, 1), (2, 1), (3, 4), (4, 4)]:
        got = r.spectra[(r.spectra.step == step) & (r.spectra.factor == "K")]["value"]
        assert got.tolist() == pytest.approx([scale * e for e in exact], rel=1e-5)
        cond = r.metric("cond", "0", "K")
        assert cond[cond.step == step]["value"].item() == pytest.approx(exact[0] / exact[-1], 1e-4)
    trace_c = r.metric("trace", "0", "C")["value"].tolist()
    assert trace_c == pytest.approx([10.0, 10.0, 10.0, 10.0, 26.0])
    assert r.spectra.groupby("step").size().tolist() == [5] * 5
    assert list(r.spectra["step"]) == sorted(r.spectra["step"])


def test_singd_with_a_worker_records_the_same_as_inline_also_between_updates():
    from singd import SINGD

    def run(workers: int):
        model = _mlp()
        opt = SINGD(model, lr=0.01, T=3)
        rec = Recorder(opt, model, every=2, workers=workers)
        _train(model, opt, rec, 7)
        mid = rec.recording  # read while training goes on: complete up to now
        assert sorted(set(mid.spectra["step"])) == [0, 2, 4, 6]
        _train(model, opt, rec, 2)
        assert 0 <= rec.flush() <= 1 and rec.flush() == 0  # nothing left after a flush
        rec.close()
        return rec.recording

    a, b = run(0), run(1)
    assert a.spectra.equals(b.spectra)
    assert sorted(set(a.spectra["step"])) == [0, 2, 4, 6, 8]
    cols = ["step", "layer", "factor", "metric"]
    sa = a.metrics.sort_values(cols, kind="stable").reset_index(drop=True)
    sb = b.metrics.sort_values(cols, kind="stable").reset_index(drop=True)
    assert sa[cols].equals(sb[cols])
    assert ((sa["value"] == sb["value"]) | (sa["value"].isna() & sb["value"].isna())).all()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_nan_factor_gets_nan_metrics_and_an_event_at_every_recorded_step(workers):
    model = _mlp()
    k = torch.eye(3)
    k[1, 2] = float("nan")
    opt = FakeFactorOptimizer(model.parameters(), k, torch.eye(2))
    rec = Recorder(opt, model, every=1, workers=workers)
    _train(model, opt, rec, 2)  # step 1: K unchanged, its cached norm is still NaN
    rec.close()
    r = rec.recording
    assert r.metric("cond", "0", "K")["value"].isna().all()
    assert len(r.spectra[r.spectra.factor == "K"]) == 0
    ev = r.events[(r.events.layer == "0") & (r.events.tensor == "K")]
    assert ev["step"].tolist() == [0, 1] and ev["n_nan"].tolist() == [1, 1]


def test_momentum_factors_get_their_frobenius_and_max_norms():
    class WithMomentum(FakeFactorOptimizer):
        def preconditioner_factors(self):
            out = super().preconditioner_factors()
            m = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
            out["0"].factors["m_C"] = FactorView(m, "momentum", "dense")
            return out

    model = _mlp()
    opt = WithMomentum(model.parameters(), torch.eye(3), torch.eye(2))
    rec = Recorder(opt, model, every=1)
    _train(model, opt, rec, 1)
    r = rec.recording
    assert r.metric("norm_max", "0", "m_C")["value"].item() == 3.0
    assert r.metric("norm_fro", "0", "m_C")["value"].item() == pytest.approx(math.sqrt(14.0))
    assert r.metric("norm_max", "0", "m_K")["value"].item() == 0.0


def test_a_slow_worker_holds_at_most_two_jobs_and_loses_none(monkeypatch):
    import time

    real = M.parts_spectra
    in_flight: list[int] = []

    def slow(items, **kw):
        time.sleep(0.02)
        return real(items, **kw)

    monkeypatch.setattr(M, "parts_spectra", slow)
    model = _mlp()
    opt = FakeFactorOptimizer(model.parameters(), torch.eye(3), torch.eye(2))
    rec = Recorder(opt, model, every=1, workers=1)
    x, y = _data()
    for i in range(6):
        opt.k = torch.eye(3) * (i + 1)  # a new K every step: a decomposition every step
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss)
        in_flight.append(rec._worker.in_flight())
    rec.close()
    assert max(in_flight) <= 2
    eig_max = rec.recording.metric("eig_max", "0", "K")["value"].tolist()
    assert eig_max == pytest.approx([float(i + 1) ** 2 for i in range(6)])
