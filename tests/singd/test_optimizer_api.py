"""SINGD's public API: reference-compatible arguments, param groups, LR schedulers,
state_dict, views, bad input."""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from optimizer_helpers import FAST, batch, flat, mlp, no_hooks, train
from torch import nn

import singd
from singd import SINGD
from singd.optimizer import DEFAULTS


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
        # this package's additions, after the reference's (so positional calls still work)
        "fallback",
        "fallback_lr",
        "betas",
        "eps",
        "fallback_weight_decay",
        "compensated",
        "grafting",
        "guard",
        "warmup_steps",
        "warmup_lr_cov",
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
        "fallback": "adamw",
        "fallback_lr": None,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "fallback_weight_decay": 1e-2,
        "compensated": False,
        "grafting": None,
        "guard": 0.5,
        "warmup_steps": None,
        "warmup_lr_cov": 0.1,
    }


def test_every_hyperparameter_is_a_param_group_key_with_its_default():
    model = mlp()
    opt = SINGD(model)
    for key, value in DEFAULTS.items():
        assert opt.param_groups[0][key] == value


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


def test_lr_scheduler_drives_the_learning_rate():
    model = mlp()
    opt = SINGD(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 2)
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


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


@pytest.mark.parametrize("key", ["lr", "momentum", "damping", "weight_decay", "T", "alpha1"])
def test_bools_are_not_numbers(key):
    model = mlp()
    with pytest.raises(ValueError, match=key):
        SINGD(model, **{key: True})
    assert no_hooks(model)
    opt = SINGD(model, [*model[0].parameters()])
    with pytest.raises(ValueError, match=key):
        opt.add_param_group({"params": [*model[2].parameters()], key: True})
    assert len(opt.param_groups) == 1


def test_lr_scheduler_lr_takes_effect_every_step():
    """The per-group config is cached, yet a scheduler's lr (written into the group between
    steps) is the one used: same trajectory as writing the lrs by hand, not the first lr's."""
    runs = {}
    for how in ("scheduler", "by hand", "constant"):
        model = mlp()
        opt = SINGD(model, **{**FAST, "lr": 0.1})
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for t in range(4):
            train(model, opt, 1, data=lambda _, t=t: batch(t))
            if how == "scheduler":
                sched.step()
            elif how == "by hand":
                opt.param_groups[0]["lr"] = 0.1 * 0.5 ** (t + 1)
        runs[how] = flat(model)
    assert torch.equal(runs["scheduler"], runs["by hand"])
    assert not torch.equal(runs["scheduler"], runs["constant"])


def test_a_changed_group_value_takes_effect_and_is_validated():
    model = mlp()
    opt = SINGD(model, **FAST)
    opt.param_groups[0]["T"] = 3  # statistics (and hooks) now only on steps 0, 3, 6, ...
    pending = []
    for t in range(6):
        X, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        pending.append(opt.statistics_pending())
        opt.step()
    assert pending == [True, False, False, True, False, False]
    opt.param_groups[0]["damping"] = 0.0
    with pytest.raises(ValueError, match="damping"):
        train(model, opt, 1)


def test_load_state_dict_validates_the_param_groups_before_loading():
    model = mlp()
    opt = SINGD(model, **FAST)
    train(model, opt, 2)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = -1.0
    other = SINGD(mlp(seed=1), **FAST)
    K = other.preconditioner_factors()["0"].factors["K"].dense()
    with pytest.raises(ValueError, match="lr"):
        other.load_state_dict(sd)
    assert other.steps == 0 and other.param_groups[0]["lr"] == FAST["lr"]
    assert torch.equal(other.preconditioner_factors()["0"].factors["K"].dense(), K)
