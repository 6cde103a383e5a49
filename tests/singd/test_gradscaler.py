"""SINGD with torch.amp.GradScaler: unscaled equivalence, skipped steps, fp16 factors,
unscale_ first."""

from __future__ import annotations

import warnings

import pytest
import torch
from optimizer_helpers import FAST, batch, flat, mlp, train
from torch import nn

from singd import SINGD


@pytest.mark.parametrize("structures", [("dense", "dense"), ("diagonal", "diagonal")])
@pytest.mark.parametrize("growth_interval", [1000, 1], ids=["constant", "changing"])
def test_grad_scaler_run_equals_unscaled_run(growth_interval, structures):
    # diagonal: the batched foreach preconditioning divides by the scale on its own path
    ref_model, model = mlp(), mlp()
    train(ref_model, SINGD(ref_model, **FAST, structures=structures), 8)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=growth_interval)
    train(model, SINGD(model, **FAST, structures=structures), 8, scaler=scaler)
    if growth_interval == 1:
        assert scaler.get_scale() == 2.0**16  # the scale really changed every step
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-6, atol=1e-7)


def test_grad_scaler_inf_step_changes_nothing_drops_statistics_and_counts():
    model = mlp()
    opt = SINGD(model, **FAST)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train(model, opt, 2, scaler=scaler)
    params = flat(model)
    factors = {
        k: {n: f.dense() for n, f in v.factors.items()}
        for k, v in opt.preconditioner_factors().items()
    }
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    X, y = batch(5)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
    assert opt.statistics_pending()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert opt.steps == 3
    assert not opt.statistics_pending()
    assert torch.equal(flat(model), params)
    for k, v in opt.preconditioner_factors().items():
        for n, f in v.factors.items():
            assert torch.equal(f.dense(), factors[k][n])
    for p, b in zip(model.parameters(), bufs):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
    assert scaler.get_scale() == 2.0**7


def test_float16_factors_with_a_large_loss_scale_stay_finite():
    """g is divided before it meets fp16: a 2^16 loss scale must not overflow H_C."""
    ref_model, model = mlp(), mlp()
    train(
        ref_model, SINGD(ref_model, preconditioner_dtype=(torch.float32, torch.float32), **FAST), 5
    )
    opt = SINGD(model, preconditioner_dtype=(torch.float16, torch.float16), **FAST)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    train(model, opt, 5, scaler=scaler)
    for v in opt.preconditioner_factors().values():
        for f in v.factors.values():
            assert torch.isfinite(f.dense()).all()
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=0.05, atol=5e-3)


def test_unscale_before_step_uses_init_grad_scale_and_warns_once():
    ref_model, model = mlp(), mlp()
    train(ref_model, SINGD(ref_model, **FAST), 4)
    opt = SINGD(model, **FAST)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(4):
            X, y = batch(t)
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # the usual reason
            for g in opt.param_groups:
                g["init_grad_scale"] = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
    assert sum("unscale_" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-6, atol=1e-7)
