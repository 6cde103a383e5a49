"""SINGD's statistics: accumulation over backward passes, their lifetime, hooks,
cross-rank reduction."""

from __future__ import annotations

import pytest
import torch
from optimizer_helpers import FAST, batch, flat, mlp, no_hooks, train
from torch import nn

from singd import SINGD


@pytest.mark.parametrize("reduction,loss_average", [("mean", "batch"), ("sum", None)])
def test_gradient_accumulation_equals_full_batch(reduction, loss_average):
    full, acc = mlp(torch.float64), mlp(torch.float64)
    hyper = dict(FAST, loss_average=loss_average, lr=0.02 if reduction == "sum" else 0.05)
    opt_full, opt_acc = SINGD(full, **hyper), SINGD(acc, **hyper)
    for t in range(4):
        X, y = batch(t, n=16, dtype=torch.float64)
        opt_full.zero_grad()
        nn.functional.cross_entropy(full(X), y, reduction=reduction).backward()
        opt_full.step()
        opt_acc.zero_grad()
        for chunk in range(4):
            sl = slice(4 * chunk, 4 * chunk + 4)
            loss = nn.functional.cross_entropy(acc(X[sl]), y[sl], reduction=reduction)
            (loss / 4 if reduction == "mean" else loss).backward()
        opt_acc.step()
    torch.testing.assert_close(flat(acc), flat(full), rtol=1e-10, atol=1e-12)


def test_inplace_activation_after_a_hooked_layer_equals_out_of_place():
    ref_model, model = mlp(inplace=False), mlp(inplace=True)
    train(ref_model, SINGD(ref_model, **FAST), 5)
    train(model, SINGD(model, **FAST), 5)
    assert torch.equal(flat(model), flat(ref_model))


def test_statistics_never_outlive_step_and_hooks_exist_only_before_update_steps():
    model = mlp()
    opt = SINGD(model, **dict(FAST, T=3))
    for t in range(7):
        assert no_hooks(model) == (t % 3 != 0)
        X, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        assert opt.statistics_pending() == (t % 3 == 0)
        opt.step()
        assert not opt.statistics_pending()


def test_zero_grad_drops_statistics_with_the_gradients():
    model = mlp()
    opt = SINGD(model, **FAST)
    X, y = batch(0)
    nn.functional.cross_entropy(model(X), y).backward()
    assert opt.statistics_pending()
    opt.zero_grad()
    assert not opt.statistics_pending()


def test_reduce_statistics_sees_all_statistics_of_an_update_step_in_one_call():
    model = mlp()
    opt = SINGD(model, **dict(FAST, T=2))
    calls = []

    def reduce(tensors, average):
        assert len(average) == len(tensors) and all(average)
        calls.append(len(tensors))
        for t in tensors:
            t.mul_(1.0)

    opt.reduce_statistics = reduce
    train(model, opt, 4)
    assert calls == [6, 6]  # steps 0 and 2; K and C of three dense layers


def test_hooks_disappear_with_the_optimizer():
    import gc

    model = mlp()
    opt = SINGD(model, **FAST)
    train(model, opt, 1)
    assert not no_hooks(model)
    del opt
    gc.collect()
    assert no_hooks(model)
