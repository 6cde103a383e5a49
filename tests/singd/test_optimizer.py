"""SINGD's contract (DESIGN section 3): API, fallback, groups, precision, GradScaler,
accumulation, in-place ops, torch.compile, state_dict, moves, views, bad input, statistics."""

from __future__ import annotations

import inspect
import io
import warnings

import pytest
import torch
from torch import nn

import singd
from singd import SINGD
from singd.optimizer import DEFAULTS


def mlp(dtype=torch.float32, inplace=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(dtype)


def batch(seed=0, n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def train(model, opt, steps, data=batch, autocast=None, scaler=None, forward=None):
    losses = []
    forward = forward or model
    for t in range(steps):
        X, y = data(t)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(forward(X), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
    return losses


FAST = dict(lr=0.05, lr_cov=0.05, damping=0.1, T=1)


def test_import_and_argument_names_match_the_reference_package():
    assert singd.SINGD is SINGD
    names = list(inspect.signature(SINGD).parameters)
    assert names == [
        "model",
        "params",
        "lr",
        "momentum",
        "damping",
        "alpha1",
        "weight_decay",
        "T",
        "lr_cov",
        "structures",
        "kfac_approx",
        "warn_unsupported",
        "kfac_like",
        "preconditioner_dtype",
        "init_grad_scale",
        "normalize_lr_cov",
        "loss_average",
    ]
    defaults = {
        k: v.default for k, v in inspect.signature(SINGD).parameters.items() if k in DEFAULTS
    }
    assert defaults == {
        "lr": 1e-3,
        "momentum": 0.9,
        "damping": 1e-3,
        "alpha1": 0.5,
        "weight_decay": 0.0,
        "T": 10,
        "lr_cov": 1e-2,
        "structures": ("dense", "dense"),
        "kfac_approx": "expand",
        "warn_unsupported": True,
        "kfac_like": False,
        "preconditioner_dtype": (None, None),
        "init_grad_scale": 1.0,
        "normalize_lr_cov": False,
        "loss_average": "batch",
    }


def test_every_hyperparameter_is_a_param_group_key_with_its_default():
    model = mlp()
    opt = SINGD(model)
    for key, value in DEFAULTS.items():
        assert opt.param_groups[0][key] == value


def test_training_reduces_the_loss_on_a_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    X, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    opt = SINGD(model, lr=0.05, lr_cov=0.05, T=2, structures=("block4diagonal", "diagonal"))
    losses = train(model, opt, 30, data=lambda t: (X, y))
    assert losses[-1] < 0.3 * losses[0]


class Zoo(nn.Module):
    """Every kind of parameter SINGD leaves to the first-order fallback, plus two Linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.gain = nn.Parameter(torch.ones(8))  # free parameter on a non-leaf module

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h).mean(1)
        h = torch.relu(self.lin(self.bn(h))) * self.gain
        return self.head(h)


def test_fallback_trains_every_other_parameter_and_one_warning_lists_them():
    torch.manual_seed(0)
    model = Zoo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SINGD(model, **FAST)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    for name in (
        "emb.weight",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "norm.weight",
        "bn.weight",
        "gain",
    ):
        assert name in messages[0]
    assert set(opt.preconditioner_factors()) == {"lin", "head"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning while training
        train(model, opt, 3, data=lambda t: (tokens, y))
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} was not trained"
    assert "fallback" in opt.state_bytes()


def test_warn_unsupported_false_silences_the_fallback_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SINGD(Zoo(), warn_unsupported=False)


def test_layer_whose_forward_is_bypassed_warns_and_still_trains():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return nn.functional.linear(x, self.lin.weight, self.lin.bias)

    model = Bypass()
    opt = SINGD(model, **FAST)
    before = flat(model)
    with pytest.warns(UserWarning, match="forward hook never ran"):
        train(model, opt, 2)
    assert not torch.equal(flat(model), before)


GROUPS = {
    "mixed": (
        dict(structures=("dense", "diagonal"), lr=0.05, T=1, lr_cov=0.05),
        dict(structures=("hierarchical2_3", "block3diagonal"), lr=0.02, T=3, momentum=0.5),
    ),
    # all-diagonal layers are updated in one batch per group: the batches must not mix
    "diagonal": (
        dict(structures=("diagonal", "diagonal"), lr=0.05, T=1, lr_cov=0.05),
        dict(structures=("diagonal", "diagonal"), lr=0.02, T=2, lr_cov=0.2, alpha1=0.0),
    ),
}


@pytest.mark.parametrize("groups", GROUPS.values(), ids=GROUPS.keys())
def test_param_groups_equal_separate_optimizers_on_disjoint_models(groups):
    a, b = mlp(seed=1), mlp(seed=2)
    a2, b2 = mlp(seed=1), mlp(seed=2)
    both = nn.ModuleDict({"a": a, "b": b})
    ga, gb = groups
    opt = SINGD(both, [dict(params=a.parameters(), **ga), dict(params=b.parameters(), **gb)])
    opt_a, opt_b = SINGD(a2, **ga), SINGD(b2, **gb)
    for t in range(7):
        X, y = batch(t)
        opt.zero_grad()
        (nn.functional.cross_entropy(a(X), y) + nn.functional.cross_entropy(b(X), y)).backward()
        opt.step()
        for m, o in ((a2, opt_a), (b2, opt_b)):
            o.zero_grad()
            nn.functional.cross_entropy(m(X), y).backward()
            o.step()
    assert torch.equal(flat(a), flat(a2))
    assert torch.equal(flat(b), flat(b2))


@pytest.mark.parametrize(
    "dtypes",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (None, torch.float16)],
)
def test_preconditioner_dtype_per_factor_trains_close_to_float32(dtypes):
    ref_model, model = mlp(), mlp()
    ref = train(ref_model, SINGD(ref_model, **FAST), 10)
    opt = SINGD(model, preconditioner_dtype=dtypes, **FAST)
    losses = train(model, opt, 10)
    factors = opt.preconditioner_factors()["0"].factors
    assert factors["K"].dtype == (dtypes[0] or torch.float32)
    assert factors["C"].dtype == (dtypes[1] or torch.float32)
    assert all(torch.isfinite(f.dense()).all() for f in factors.values())
    assert abs(losses[-1] - ref[-1]) < 0.05 * ref[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_trains_like_float32(dtype):
    fixed = batch(0)
    ref_model, model = mlp(), mlp()
    ref = train(ref_model, SINGD(ref_model, **FAST), 15, data=lambda t: fixed)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    opt = SINGD(model, **FAST)
    losses = train(model, opt, 15, data=lambda t: fixed, autocast=dtype, scaler=scaler)
    assert losses[-1] < 0.85 * losses[0]
    assert abs(losses[-1] - ref[-1]) < 0.03
    assert opt.steps == 15


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


def test_torch_compiled_model_equals_eager_model():
    """aot_eager traces forward and backward like inductor without a C++ build (inductor
    gives the same result but compiles for ~45 s on this machine)."""
    ref_model, model = mlp(), mlp()
    train(ref_model, SINGD(ref_model, **dict(FAST, T=2)), 5)
    compiled = torch.compile(model, backend="aot_eager")
    opt = SINGD(compiled, **dict(FAST, T=2))
    train(model, opt, 5, forward=compiled)
    assert set(opt.preconditioner_factors()) == {"0", "2", "4"}
    torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-6, atol=1e-7)


def test_state_dict_loads_weights_only_and_resume_is_bitwise_identical():
    hyper = dict(
        FAST,
        T=3,
        alpha1=0.5,
        weight_decay=0.01,
        lr_cov=lambda step: 0.05 / (1 + 0.1 * step),
        structures=("dense", "hierarchical2_3"),
    )
    ref_model = mlp()
    ref_opt = SINGD(ref_model, **hyper)
    train(ref_model, ref_opt, 10)

    model = mlp()
    opt = SINGD(model, **hyper)
    train(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    model2 = mlp(seed=7)
    model2.load_state_dict(loaded["model"])
    opt2 = SINGD(model2, **hyper)
    opt2.load_state_dict(loaded["opt"])
    assert opt2.steps == 5
    assert callable(opt2.param_groups[0]["lr_cov"])
    train(model2, opt2, 5, data=lambda t: batch(t + 5))
    assert torch.equal(flat(model2), flat(ref_model))


def test_state_dict_round_trips_low_precision_factor_dtypes():
    model = mlp()
    opt = SINGD(model, preconditioner_dtype=(torch.bfloat16, None), **FAST)
    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = SINGD(mlp(), preconditioner_dtype=(torch.bfloat16, None), **FAST)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["preconditioner_dtype"] == (torch.bfloat16, None)
    f1, f2 = opt.preconditioner_factors()["0"].factors, opt2.preconditioner_factors()["0"].factors
    assert f2["K"].dtype == torch.bfloat16
    assert torch.equal(f1["K"].dense(), f2["K"].dense())


def test_model_moved_to_another_dtype_after_construction_keeps_training():
    model = mlp()
    opt = SINGD(model, **FAST)
    train(model, opt, 2)
    model.double()
    losses = train(model, opt, 8, data=lambda t: batch(t, dtype=torch.float64))
    factors = opt.preconditioner_factors()["0"].factors
    assert factors["K"].dtype == torch.float64 and factors["C"].dtype == torch.float64
    assert opt.state[model[0].weight]["momentum_buffer"].dtype == torch.float64
    assert losses[-1] < losses[0]


def test_preconditioner_dtype_changed_in_the_param_group_moves_the_factors():
    model = mlp()
    opt = SINGD(model, **FAST)
    train(model, opt, 2)
    opt.param_groups[0]["preconditioner_dtype"] = (torch.bfloat16, None)
    fixed = batch(0)
    losses = train(model, opt, 8, data=lambda t: fixed)
    factors = opt.preconditioner_factors()["0"].factors
    assert factors["K"].dtype == torch.bfloat16 and factors["C"].dtype == torch.float32
    assert all(torch.isfinite(f.dense()).all() for f in factors.values())
    assert losses[-1] < losses[0]


def test_preconditioner_factors_and_state_bytes_follow_the_view_contract():
    model = mlp()
    opt = SINGD(model, structures=("diagonal", "dense"), **dict(FAST, T=2))
    train(model, opt, 2)
    views = opt.preconditioner_factors()
    assert set(views) == {"0", "2", "4"}
    lf = views["2"]
    assert lf.layer == "2" and lf.module_type == "Linear"
    assert set(lf.factors) == {"K", "C", "m_K", "m_C"}
    assert lf.factors["K"].role == "root" and lf.factors["m_C"].role == "momentum"
    assert lf.factors["K"].structure == "diagonal" and lf.factors["C"].structure == "dense"
    assert lf.factors["K"].dim == 9 and lf.factors["C"].dim == 8
    sizes = opt.state_bytes()
    assert set(sizes) == {"0", "2", "4"}
    assert set(sizes["2"]) == {"K", "C", "m_K", "m_C", "momentum"}
    assert sizes["2"]["m_K"] == 9 * 4 and sizes["2"]["m_C"] == 8 * 8 * 4
    assert sizes["2"]["momentum"] == (8 * 8 + 8) * 4
    no_momentum = SINGD(mlp(), alpha1=0.0)
    assert set(no_momentum.preconditioner_factors()["0"].factors) == {"K", "C"}
    assert set(no_momentum.state_bytes()["0"]) == {"K", "C", "momentum"}


def no_hooks(model):
    return all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr_cov=-0.1), "lr_cov"),
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(T=0), "T"),
        (dict(T=2.5), "T"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(alpha1=1.0), "alpha1"),
        (dict(alpha1=-0.5), "alpha1"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(structures=("dense", "nonsense")), "structures"),
        (dict(structures=("dense",)), "structures"),
        (dict(structures=("dense", "dense", "dense")), "structures"),
        (dict(structures="dense"), "structures"),
        (dict(loss_average="mean"), "loss_average"),
        (dict(kfac_approx="average"), "kfac_approx"),
        (dict(preconditioner_dtype=(torch.int32, None)), "preconditioner_dtype"),
        (dict(init_grad_scale=0.0), "init_grad_scale"),
        (dict(kfac_like="yes"), "kfac_like"),
    ],
)
def test_bad_hyperparameter_raises_naming_it_and_leaves_no_hooks(kwargs, argument):
    model = mlp()
    with pytest.raises(ValueError, match=argument):
        SINGD(model, **kwargs)
    assert no_hooks(model)


def test_bad_param_group_raises_and_leaves_no_hooks():
    model = mlp()
    groups = [
        dict(params=model[0].parameters()),
        dict(params=list(model[2].parameters()) + list(model[4].parameters()), T=0),
    ]
    with pytest.raises(ValueError, match="T must be"):
        SINGD(model, groups)
    assert no_hooks(model)


def test_unknown_structure_error_lists_valid_forms():
    with pytest.raises(ValueError, match="block\\{N\\}diagonal"):
        SINGD(mlp(), structures=("dense", "blockdiagonal"))


def test_closure_is_rejected():
    model = mlp()
    opt = SINGD(model, **FAST)
    before = flat(model)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    assert torch.equal(flat(model), before) and opt.steps == 0


def test_weight_and_bias_in_different_groups_raise_and_leave_no_hooks():
    model = mlp()
    groups = [
        dict(params=[model[0].weight]),
        dict(params=[model[0].bias, *model[2].parameters(), *model[4].parameters()]),
    ]
    with pytest.raises(ValueError, match="same param group"):
        SINGD(model, groups)
    assert no_hooks(model)
    with pytest.raises(ValueError, match="same param group"):
        SINGD(model, [model[0].weight])
    assert no_hooks(model)


def test_model_without_trainable_parameters_raises():
    model = mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        SINGD(model)
    with pytest.raises(TypeError, match="model"):
        SINGD([nn.Parameter(torch.zeros(2))])
    assert no_hooks(model)


def test_params_outside_the_model_raise():
    with pytest.raises(ValueError, match="not parameters of model"):
        SINGD(mlp(), [nn.Parameter(torch.zeros(3))])


def test_kfac_like_warns_that_alpha1_is_ignored():
    with pytest.warns(UserWarning, match="alpha1"):
        opt = SINGD(mlp(), kfac_like=True, alpha1=0.5)
    assert set(opt.preconditioner_factors()["0"].factors) == {"K", "C"}


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


def test_lr_scheduler_drives_the_learning_rate():
    model = mlp()
    opt = SINGD(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 2)
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_ddp_wrapped_model_trains_like_the_plain_model(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        ref_model, model = mlp(), mlp()
        train(ref_model, SINGD(ref_model, **FAST), 3)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = SINGD(ddp, **FAST)
        assert set(opt.preconditioner_factors()) == {"0", "2", "4"}
        train(model, opt, 3, forward=ddp)
        torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_sparse_factors_above_the_dense_gram_limit_store_no_dense_matrix():
    """T > 1 caches K K^T densely only for small factors; a large hierarchical factor keeps
    O(d) memory (its state bytes are exactly its stored entries)."""
    from singd.update import DENSE_GRAM_MAX

    torch.manual_seed(0)
    d = DENSE_GRAM_MAX + 44
    model = nn.Linear(d - 1, d)
    opt = SINGD(model, T=2, alpha1=0.0, structures=("hierarchical15_15", "diagonal"))
    X = torch.randn(8, d - 1)
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()
    K = opt.preconditioner_factors()[""].factors["K"].matrix
    assert opt.state_bytes()[""]["K"] == K.numel() * 4 < d * d * 4 // 4
    assert opt.state_bytes()[""]["C"] == 2 * d * 4  # diagonal C plus its squared entries


def test_add_param_group_after_construction_sets_up_its_layers():
    model = mlp()
    opt = SINGD(model, [*model[0].parameters()], **FAST)
    assert set(opt.preconditioner_factors()) == {"0"}
    with pytest.raises(ValueError, match="T must be"):
        opt.add_param_group({"params": [*model[2].parameters()], "T": 0})
    assert len(opt.param_groups) == 1 and no_hooks(model[2])
    opt.add_param_group({"params": [*model[2].parameters(), *model[4].parameters()], "lr": 0.01})
    assert set(opt.preconditioner_factors()) == {"0", "2", "4"}
    before = flat(model)
    train(model, opt, 2)
    K = opt.preconditioner_factors()["4"].factors["K"].dense()
    assert not torch.equal(K, torch.eye(9))
    assert not torch.equal(flat(model), before)


def test_hooks_disappear_with_the_optimizer():
    import gc

    model = mlp()
    opt = SINGD(model, **FAST)
    train(model, opt, 1)
    assert not no_hooks(model)
    del opt
    gc.collect()
    assert no_hooks(model)


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
