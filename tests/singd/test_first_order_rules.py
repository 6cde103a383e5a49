"""The first-order rules of SINGD and KFAC: the AdamW fallback (default), 'heavy_ball' and
'none', Kahan-compensated 16-bit updates, and their state in checkpoints."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from optimizer_helpers import FAST, batch, flat, train
from torch import nn

from singd import KFAC, SINGD


def normed(dtype=torch.float32, seed=0):
    """Linear layers with a LayerNorm between them (whose weight and bias take the fallback)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def quiet(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


@pytest.mark.parametrize("optimizer", [SINGD, KFAC])
def test_default_fallback_is_torch_adamw_on_the_unsupported_parameters(optimizer):
    model = normed()
    ln = model[1]
    mirror = [nn.Parameter(p.detach().clone()) for p in ln.parameters()]
    opt = quiet(optimizer, model, lr=3e-3, fallback_weight_decay=0.05, betas=(0.8, 0.99))
    adamw = torch.optim.AdamW(mirror, lr=3e-3, weight_decay=0.05, betas=(0.8, 0.99))
    for t in range(6):
        X, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        for m, p in zip(mirror, ln.parameters()):
            m.grad = p.grad.clone()
        opt.step()
        adamw.step()
    for m, p in zip(mirror, ln.parameters()):
        torch.testing.assert_close(p.detach(), m.detach(), rtol=1e-5, atol=1e-7)
    assert opt.state_bytes()["fallback"]["exp_avg"] == 4 * 16


def test_fallback_lr_sets_the_adamw_step_apart_from_the_group_lr():
    runs = []
    for fallback_lr in (None, 1e-2):
        model = normed()
        opt = quiet(SINGD, model, lr=1e-3, fallback_lr=fallback_lr)
        train(model, opt, 2)
        runs.append(model[1].weight.detach().clone())
    moved = [(r - 1.0).abs().max().item() for r in runs]
    assert moved[1] > 5 * moved[0]  # Adam's steps are about lr in size


def test_fallback_none_leaves_unsupported_parameters_untouched_and_says_so_once():
    model = normed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SINGD(model, fallback="none", **FAST)
    messages = [str(w.message) for w in caught if "fallback" in str(w.message)]
    assert len(messages) == 1 and "untrained" in messages[0] and "1.weight" in messages[0]
    train(model, opt, 3)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (not name.startswith("1.")), name
    assert "exp_avg" not in opt.state_bytes()["fallback"]


def test_bad_fallback_settings_name_the_argument_and_build_nothing():
    for kwargs, words in (
        (dict(fallback="adam"), ["fallback", "'adamw'", "'heavy_ball'", "'none'"]),
        (dict(betas=(0.9, 1.0)), ["betas"]),
        (dict(betas=0.9), ["betas", "pair"]),
        (dict(eps=0.0), ["eps"]),
        (dict(fallback_lr=-1.0), ["fallback_lr"]),
        (dict(compensated=1), ["compensated"]),
        (dict(grafting="shampoo"), ["grafting", "'adam'"]),
        (dict(guard=0.0), ["guard"]),
    ):
        with pytest.raises(ValueError) as info:
            SINGD(normed(), **kwargs)
        assert all(w in str(info.value) for w in words), (kwargs, str(info.value))
    opt = quiet(SINGD, normed())
    with pytest.raises(ValueError, match="fallback"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "fallback": "sgd"})


def bf16(t):
    """Batch ``t`` with bfloat16 inputs."""
    return tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in batch(t))


def test_fallback_state_survives_a_weights_only_checkpoint_and_resumes_bitwise():
    def run(split):
        model = normed(torch.bfloat16)
        opt = quiet(SINGD, model, compensated=True, **FAST)
        train(model, opt, split, data=bf16)
        if split < 6:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            model = normed(torch.bfloat16, seed=1)
            model.load_state_dict(saved["model"])
            opt = quiet(SINGD, model, compensated=True, **FAST)
            opt.load_state_dict(saved["opt"])
            assert opt.state[model[1].weight]["exp_avg"].dtype == torch.float32
            train(model, opt, 6 - split, data=lambda t: bf16(t + split))
        return flat(model)

    assert torch.equal(run(6), run(3))


def test_grad_scaler_inf_step_leaves_the_fallback_and_its_moments_alone():
    model = normed()
    opt = quiet(SINGD, model, **FAST)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train(model, opt, 2, scaler=scaler)
    ln = model[1]
    before = ln.weight.detach().clone()
    moments = opt.state[ln.weight]["exp_avg"].clone()
    X, y = batch(5)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
    ln.weight.grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert torch.equal(ln.weight, before)
    assert torch.equal(opt.state[ln.weight]["exp_avg"], moments)
    assert opt.state[ln.weight]["adam_step"] == 2


@pytest.mark.parametrize("fallback", ["adamw", "heavy_ball"])
def test_compensated_bf16_parameters_follow_the_float32_run_where_plain_ones_stall(fallback):
    """lr far below half a bf16 ulp of the LayerNorm weight (1.0): plain bf16 updates are
    lost, compensated ones accumulate like float32's."""
    lr = 2e-4 if fallback == "adamw" else 2e-2
    hyper = dict(lr=lr, momentum=0.0, fallback=fallback, T=1, damping=0.1)
    results = {}
    for name, dtype, compensated in (
        ("fp32", torch.float32, False),
        ("plain", torch.bfloat16, False),
        ("kahan", torch.bfloat16, True),
    ):
        model = normed(dtype)
        opt = quiet(SINGD, model, compensated=compensated, **hyper)
        fixed = tuple(x.to(dtype) if x.is_floating_point() else x for x in batch(0))
        train(model, opt, 60, data=lambda t: fixed)  # noqa: B023
        results[name] = model[1].weight.detach().float()
    moved = (results["fp32"] - 1.0).abs()
    assert moved.max() > 0.008  # the float32 run moved by more than two bf16 ulps of 1.0
    assert torch.equal(results["plain"], torch.ones(8))  # every plain bf16 update was lost
    ulp = 2.0**-7
    assert ((results["kahan"] - results["fp32"]).abs() <= 2 * ulp).all()
    assert ((results["kahan"] - 1.0).abs() >= ulp).sum() >= 4  # it moved like the fp32 run


def test_compensation_buffers_are_counted_and_only_for_16_bit_parameters():
    model = normed(torch.bfloat16)
    opt = quiet(SINGD, model, compensated=True, **FAST)
    fixed = tuple(x.to(torch.bfloat16) if x.is_floating_point() else x for x in batch(0))
    train(model, opt, 2, data=lambda t: fixed)
    sizes = opt.state_bytes()
    assert sizes["0"]["compensation"] == 2 * (6 * 8 + 8)
    assert sizes["fallback"]["compensation"] == 2 * 16
    model32 = normed()
    opt32 = quiet(SINGD, model32, compensated=True, **FAST)
    train(model32, opt32, 2)
    assert all("compensation" not in opt32.state[p] for p in model32.parameters())
