"""Tests for the KFAC baseline against explicit damped Kronecker-inverse math."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from singd import KFAC
from singd.kfac import KFACInverseError, damped_inverse


def _joint(layer: nn.Module) -> torch.Tensor:
    """``[W, b]`` of a Linear/Conv2d layer as a d_C x d_K matrix (a copy)."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return torch.cat([w, layer.bias.detach()[:, None]], 1).clone()


def _linear_problem(seed=0, n=8, d_in=5, d_out=3):
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out)
    return layer, torch.randn(n, d_in), torch.randn(n, d_out)


def _explicit_factors(layer, x, y):
    """A = a^T a / n (ones column), G = n g^T g with g = dloss/doutput, and grad [W, b]."""
    out = layer(x)
    loss = ((out - y) ** 2).sum(1).mean()
    g_out, gw, gb = torch.autograd.grad(loss, [out, layer.weight, layer.bias])
    n = x.shape[0]
    a = torch.cat([x, torch.ones(n, 1)], 1)
    A = a.T @ a / n
    G = n * g_out.T @ g_out
    return A, G, torch.cat([gw, gb[:, None]], 1)


def _kfac_step(opt, layer, x, y):
    opt.zero_grad()
    loss = ((layer(x) - y) ** 2).sum(1).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_step_equals_explicit_damped_kronecker_inverse_update(method):
    layer, x, y = _linear_problem()
    lam, lr = 0.1, 0.5
    A, G, grad = _explicit_factors(layer, x, y)
    W0 = _joint(layer)
    opt = KFAC(layer, lr=lr, momentum=0.0, damping=lam, T=1, inverse_method=method)
    _kfac_step(opt, layer, x, y)
    expected = W0 - lr * torch.linalg.inv(G + lam * torch.eye(3)) @ grad @ torch.linalg.inv(
        A + lam * torch.eye(6)
    )
    torch.testing.assert_close(_joint(layer), expected, rtol=1e-5, atol=1e-6)


def test_factors_are_an_ema_whose_first_update_is_the_statistic():
    layer, x, y = _linear_problem(n=16)
    rho = 0.7
    opt = KFAC(layer, lr=0.1, damping=0.1, T=1, ema_decay=rho)
    A1, G1, _ = _explicit_factors(layer, x[:8], y[:8])
    _kfac_step(opt, layer, x[:8], y[:8])
    A2, G2, _ = _explicit_factors(layer, x[8:], y[8:])
    _kfac_step(opt, layer, x[8:], y[8:])
    f = opt.preconditioner_factors()[""].factors
    torch.testing.assert_close(f["A"].dense(), rho * A1 + (1 - rho) * A2)
    torch.testing.assert_close(f["G"].dense(), rho * G1 + (1 - rho) * G2)


def test_heavy_ball_momentum_and_weight_decay_follow_the_design():
    layer, x, y = _linear_problem()
    lam, lr, mom, wd = 0.1, 0.2, 0.9, 0.01
    opt = KFAC(layer, lr=lr, momentum=mom, damping=lam, weight_decay=wd, T=100)
    W0 = _joint(layer)
    A, G, grad0 = _explicit_factors(layer, x, y)
    Ai = torch.linalg.inv(A + lam * torch.eye(6))
    Gi = torch.linalg.inv(G + lam * torch.eye(3))
    _kfac_step(opt, layer, x, y)
    buf = Gi @ grad0 @ Ai + wd * W0
    W1 = W0 - lr * buf
    _, _, grad1 = _explicit_factors(layer, x, y)  # factors frozen (T=100): same inverses
    _kfac_step(opt, layer, x, y)
    buf = mom * buf + Gi @ grad1 @ Ai + wd * W1
    torch.testing.assert_close(_joint(layer), W1 - lr * buf, rtol=1e-5, atol=1e-6)


def test_conv2d_factor_a_is_the_mean_outer_product_of_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(4, 2, 6, 6)
    opt = KFAC(conv, lr=0.1, damping=0.1, T=1)
    opt.zero_grad()
    conv(x).square().mean().backward()
    opt.step()
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    a = torch.cat([patches, torch.ones(len(patches), 1)], 1)
    A = opt.preconditioner_factors()[""].factors["A"].dense()
    torch.testing.assert_close(A, a.T @ a / len(a))


def test_inverses_are_refreshed_only_every_T_steps():
    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.01, damping=0.1, T=3)
    seen = []
    for _ in range(4):
        _kfac_step(opt, layer, x + 0.1 * torch.randn_like(x), y)
        seen.append(opt.preconditioner_factors()[""].factors["A_inv"].dense())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3])
    assert opt.steps == 4


def test_views_expose_symmetric_dense_factors_and_their_inverses():
    layer, x, y = _linear_problem()
    lam = 0.1
    opt = KFAC(layer, lr=0.01, damping=lam, T=1)
    assert opt.preconditioner_factors() == {}
    _kfac_step(opt, layer, x, y)
    view = opt.preconditioner_factors()[""]
    assert view.module_type == "Linear"
    assert set(view.factors) == {"A", "G", "A_inv", "G_inv"}
    assert {f.role for f in view.factors.values()} == {"symmetric"}
    assert {f.structure for f in view.factors.values()} == {"dense"}
    A, A_inv = view.factors["A"].dense(), view.factors["A_inv"].dense()
    assert view.factors["A"].dim == 6 and view.factors["G"].dim == 3
    torch.testing.assert_close(A_inv @ (A + lam * torch.eye(6)), torch.eye(6), atol=1e-4, rtol=0)


def test_bf16_factors_raise_a_clear_error_under_the_raise_policy():
    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.01, damping=0.1, factor_dtype=torch.bfloat16, on_inverse_failure="raise")
    with pytest.raises(KFACInverseError, match="bfloat16.*on_inverse_failure='upcast'"):
        _kfac_step(opt, layer, x, y)


def test_bf16_factors_are_inverted_in_float32_under_upcast_and_the_cost_is_counted():
    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.01, damping=0.1, T=1, factor_dtype="bfloat16")
    W0 = _joint(layer)
    _kfac_step(opt, layer, x, y)
    f = opt.preconditioner_factors()[""].factors
    assert f["A"].dtype == torch.bfloat16 and f["A_inv"].dtype == torch.float32
    assert opt.upcast_count() == 2
    sizes = opt.state_bytes()[""]
    assert sizes["A"] == 6 * 6 * 2 and sizes["A_inv"] == 6 * 6 * 4
    assert sizes["A_upcast"] == 6 * 6 * 4 and sizes["G_upcast"] == 3 * 3 * 4
    assert torch.isfinite(_joint(layer)).all() and not torch.equal(_joint(layer), W0)


def test_damped_inverse_upcasts_refused_dtypes_and_raises_when_upcasting_cannot_help():
    M = torch.eye(3, dtype=torch.bfloat16) * 2
    inv, up = damped_inverse(M, 1.0)
    assert up == torch.float32
    torch.testing.assert_close(inv, torch.eye(3) / 3)
    inv, up = damped_inverse(M.float(), 1.0)
    assert up is None
    with pytest.raises(KFACInverseError, match="on_inverse_failure"):
        damped_inverse(M, 1.0, on_failure="raise", what="factor A")
    bad = torch.full((3, 3), float("inf"))
    with pytest.raises(KFACInverseError, match="nor after upcasting"):
        damped_inverse(bad, 1.0, method="eigh")
    with pytest.raises(ValueError, match="method must be one of"):
        damped_inverse(M, 1.0, method="lu")


def test_eigh_and_cholesky_inverses_agree_on_a_psd_factor():
    torch.manual_seed(1)
    X = torch.randn(10, 4, dtype=torch.float64)
    M = X.T @ X
    a, _ = damped_inverse(M, 0.01, method="cholesky")
    b, _ = damped_inverse(M, 0.01, method="eigh")
    torch.testing.assert_close(a, b)


def test_unsupported_parameters_take_the_first_order_fallback_and_are_listed():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=r"heavy-ball.*1\.weight.*LayerNorm"):
        opt = KFAC(model, lr=0.1, momentum=0.0, damping=0.1, fallback="heavy_ball")
    ln = model[1]
    w0 = ln.weight.detach().clone()
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    expected = w0 - 0.1 * ln.weight.grad
    opt.step()
    torch.testing.assert_close(ln.weight.detach(), expected)
    assert set(opt.fallback_parameters()) == {"1.weight", "1.bias"}
    assert set(opt.preconditioner_factors()) == {"0", "2"}


def test_multihead_attention_parameters_are_trained_by_the_fallback():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = KFAC(mha, lr=0.1, damping=0.1)
    assert "out_proj.weight" in opt.fallback_parameters()
    before = [p.detach().clone() for p in mha.parameters()]
    x = torch.randn(3, 5, 8)
    opt.zero_grad()
    mha(x, x, x)[0].square().mean().backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, mha.parameters()))
    assert opt.state_bytes()["fallback"]["exp_avg"] > 0  # the default AdamW fallback


def test_grad_scaler_steps_match_unscaled_steps():
    results = []
    for scale in (None, 1024.0):
        layer, x, y = _linear_problem()
        opt = KFAC(layer, lr=0.1, damping=0.1, T=1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        for _ in range(3):
            opt.zero_grad()
            loss = ((layer(x) - y) ** 2).sum(1).mean()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        results.append((_joint(layer), opt.preconditioner_factors()[""].factors["G"].dense()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_state_dict_round_trips_through_weights_only_load_keeping_factor_dtypes():
    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.05, damping=0.1, T=2, factor_dtype=torch.bfloat16)
    for _ in range(3):
        _kfac_step(opt, layer, x, y)
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    layer2, _, _ = _linear_problem()
    layer2.load_state_dict(saved["model"])
    opt2 = KFAC(layer2, lr=0.05, damping=0.1, T=2, factor_dtype=torch.bfloat16)
    opt2.load_state_dict(saved["opt"])
    f2 = opt2.preconditioner_factors()[""].factors
    assert f2["A"].dtype == torch.bfloat16 and f2["A_inv"].dtype == torch.float32
    assert opt2.steps == 3
    _kfac_step(opt, layer, x, y)
    _kfac_step(opt2, layer2, x, y)
    torch.testing.assert_close(_joint(layer), _joint(layer2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr must be"),
        ({"damping": 0.0}, "damping must be > 0"),
        ({"T": 0}, "T must be an int >= 1"),
        ({"momentum": 1.0}, "momentum must lie in"),
        ({"ema_decay": 1.0}, "ema_decay must lie in"),
        ({"inverse_method": "lu"}, "inverse_method must be one of"),
        ({"on_inverse_failure": "ignore"}, "on_inverse_failure must be one of"),
        ({"factor_dtype": "half"}, "factor_dtype must be one of"),
        ({"inverse_dtype": torch.int32}, "inverse_dtype must be one of"),
        ({"kfac_approx": "mean"}, "kfac_approx must be one of"),
        ({"loss_average": "sum"}, "loss_average must be one of"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument_and_leave_no_hooks(kwargs, match):
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        KFAC(model, **kwargs)
    assert not model[0]._forward_hooks


def test_bad_models_params_and_closures_are_rejected():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        KFAC("mlp")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        KFAC(frozen)
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same param group"):
        KFAC(layer, params=[{"params": [layer.weight]}, {"params": [layer.bias]}])
    assert not layer._forward_hooks
    opt = KFAC(layer)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_hooks_are_removed_when_the_optimizer_is_collected():
    import gc

    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.01, damping=0.1)
    assert layer._forward_hooks
    del opt
    gc.collect()
    assert not layer._forward_hooks
    layer(x).sum().backward()  # no stale hook runs


def test_an_explicit_wider_inverse_dtype_counts_its_working_copy_without_an_upcast():
    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.01, damping=0.1, T=1, factor_dtype="bfloat16", inverse_dtype="float32")
    _kfac_step(opt, layer, x, y)
    assert opt.upcast_count() == 0
    sizes = opt.state_bytes()[""]
    assert sizes["A"] == 6 * 6 * 2 and sizes["A_upcast"] == 6 * 6 * 4
    layer2, x2, y2 = _linear_problem()
    plain = KFAC(layer2, lr=0.01, damping=0.1, T=1)
    _kfac_step(plain, layer2, x2, y2)
    assert "A_upcast" not in plain.state_bytes()[""]


@pytest.mark.parametrize("key", ["lr", "momentum", "damping", "weight_decay", "T", "ema_decay"])
def test_bools_are_not_numbers(key):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=key):
        KFAC(model, **{key: True})
    assert not model[0]._forward_hooks
    opt = KFAC(model, [*model[0].parameters()])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [*model[1].parameters()], key: True})
    assert len(opt.param_groups) == 1


def test_lr_scheduler_lr_takes_effect_and_load_state_dict_validates():
    layer, x, y = _linear_problem()
    opt = KFAC(layer, lr=0.1, damping=0.1, T=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        ((layer(x) - y) ** 2).mean().backward()
        opt.step()
        sched.step()
    before = layer.weight.detach().clone()
    opt.zero_grad()
    ((layer(x) - y) ** 2).mean().backward()
    opt.step()
    buf = opt.state[layer.weight]["momentum_buffer"]
    torch.testing.assert_close(layer.weight.detach(), before - 0.025 * buf)
    sd = opt.state_dict()
    sd["param_groups"][0]["damping"] = 0.0
    with pytest.raises(ValueError, match="damping"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["damping"] == 0.1 and opt.steps == 3
