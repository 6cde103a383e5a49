"""SINGD's Adam grafting (the step of each layer has Adam's norm and SINGD's direction) and
the guard on the multiplicative factor update (a trust region, inactive on small steps)."""

from __future__ import annotations

import math

import pytest
import torch
from optimizer_helpers import batch, flat, mlp, train
from torch import nn

from singd import SINGD
from singd.structures import structure
from singd.update import riemannian_step, spectral_bound


def one_step(model, **hyper):
    """Parameters before and after one SINGD step on batch 0, and the optimizer."""
    opt = SINGD(model, **hyper)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1)
    return before, [p.detach().clone() for p in model.parameters()], opt


def test_grafted_step_has_adams_norm_per_layer_and_singds_direction():
    hyper = dict(lr=1e-2, momentum=0.0, T=1, lr_cov=0.1, damping=0.1)
    b0, a0, _ = one_step(mlp(), **hyper)
    b1, a1, opt = one_step(mlp(), grafting="adam", **hyper)
    model = mlp()
    X, y = batch(0)
    nn.functional.cross_entropy(model(X), y).backward()
    params = list(model.parameters())
    for i in range(0, len(params), 2):  # (weight, bias) of each Linear
        plain = torch.cat([(a0[j] - b0[j]).flatten() for j in (i, i + 1)])
        grafted = torch.cat([(a1[j] - b1[j]).flatten() for j in (i, i + 1)])
        # Adam's first step is g / (|g| + eps): the norm of its update is lr * sqrt(#nonzero)
        grads = torch.cat([params[j].grad.flatten() for j in (i, i + 1)])
        adam_norm = 1e-2 * (grads / (grads.abs() + 1e-8)).norm()
        assert math.isclose(grafted.norm().item(), adam_norm.item(), rel_tol=1e-4)
        cosine = torch.nn.functional.cosine_similarity(plain, grafted, dim=0)
        assert cosine > 1 - 1e-5  # same direction as SINGD's own step
    assert opt.state_bytes()["0"]["exp_avg"] == 4 * (6 * 8 + 8)


def test_grafting_makes_the_step_size_independent_of_the_gradient_scale():
    """Scaling the loss by 1000 moves SINGD's raw step, not the grafted one (as with Adam)."""
    steps = []
    for scale in (1.0, 1000.0):
        model = mlp()
        opt = SINGD(model, lr=1e-2, grafting="adam", T=1, lr_cov=0.1, damping=0.1)
        before = flat(model)
        X, y = batch(0)
        (scale * nn.functional.cross_entropy(model(X), y)).backward()
        opt.step()
        steps.append((flat(model) - before).norm().item())
    assert math.isclose(steps[0], steps[1], rel_tol=1e-3)


def test_grafting_at_adamws_lr_trains_like_adamw_where_plain_singd_crawls():
    """On one fixed batch at AdamW's lr the grafted run fits about as well as AdamW (0.34 vs
    0.31 here) and far better than ungrafted SINGD at that lr (0.87), the one-line switch."""
    fixed = batch(0)
    losses = {}
    for name in ("adamw", "graft", "plain"):
        model = mlp()
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        else:
            opt = SINGD(model, lr=1e-2, grafting="adam" if name == "graft" else None)
        losses[name] = sum(train(model, opt, 60, data=lambda t: fixed)[-5:]) / 5  # noqa: B023
    assert losses["graft"] < 2 * losses["adamw"], losses
    assert losses["graft"] < 0.6 * losses["plain"], losses


def test_guard_is_inactive_on_small_steps_so_the_trajectory_is_the_unguarded_one():
    runs = []
    for guard in (None, 0.5):
        model = mlp()
        opt = SINGD(model, guard=guard, T=1)
        train(model, opt, 20)
        runs.append(flat(model))
        if guard is not None:
            assert opt.guard_activations() == []
    assert torch.equal(runs[0], runs[1])


def test_guard_bounds_each_factor_update_and_logs_every_activation():
    for structures in (("dense", "dense"), ("diagonal", "diagonal"), ("block4diagonal", "tril")):
        model = mlp()
        opt = SINGD(model, lr=1e-3, lr_cov=50.0, T=1, damping=0.1, structures=structures)
        norms = []
        for t in range(4):
            train(model, opt, 1, data=lambda _: batch(t))  # noqa: B023
            norms.append(
                {
                    k: f.factors["K"].dense().norm(2).item()
                    for k, f in opt.preconditioner_factors().items()
                }
            )
        log = opt.guard_activations()
        assert log and all(a.reach > 0.5 for a in log), structures
        assert {a.factor for a in log} <= {"K", "C"}
        assert {a.layer for a in log} <= {"0", "2", "4"}
        for earlier, later in zip(norms, norms[1:]):  # ||K (I - beta m)|| <= 1.5 ||K||
            for k in earlier:
                assert later[k] <= 1.5 * earlier[k] * (1 + 1e-4), (structures, k)
        assert torch.isfinite(flat(model)).all()


def test_riemannian_step_guard_caps_beta_times_the_spectral_bound():
    torch.manual_seed(0)
    d = 5
    cls = structure("dense")
    K, C = cls.eye(d), cls.eye(d)
    X = torch.randn(50, d) * 10
    H_K = cls.from_dense(X.T @ X / 50)
    H_C = cls.from_dense(X.T @ X / 50)
    seen = []
    riemannian_step(
        K, C, H_K, H_C, None, None, damping=0.1, alpha1=0.0, lr_cov=1.0, guard=0.5,
        observe=lambda side, reach: seen.append((side, reach)),
    )  # fmt: skip
    assert [s for s, _ in seen] == ["K", "C"] and all(r > 0.5 for _, r in seen)
    # K = I - beta m with ||beta m||_2 <= 0.5: singular values in [0.5, 1.5]
    sv = torch.linalg.svdvals(K.to_dense())
    assert sv.min() >= 0.5 - 1e-5 and sv.max() <= 1.5 + 1e-5


def test_spectral_bound_bounds_the_spectral_norm_of_every_structure():
    torch.manual_seed(1)
    for name in ("dense", "diagonal", "block3diagonal", "hierarchical2_3", "triltoeplitz", "triu"):
        cls = structure(name)
        A = torch.randn(7, 7, dtype=torch.float64)
        m = cls.from_dense(A + A.T)
        bound = spectral_bound(m).item()
        assert torch.linalg.matrix_norm(m.to_dense(), 2).item() <= bound * (1 + 1e-5), name


def test_warmup_updates_the_preconditioner_every_step_with_a_larger_lr_cov_then_every_T():
    model = mlp()
    opt = SINGD(model, T=10, lr_cov=0.01, warmup_steps=3, warmup_lr_cov=0.1)
    cfg = opt._config(opt.param_groups[0])
    assert [cfg.due(s) for s in range(12)] == [True] * 3 + [False] * 7 + [True, False]
    assert cfg.beta1(2) == 0.1 and cfg.beta1(3) == 0.01
    changed = []
    for t in range(12):
        before = opt.preconditioner_factors()["0"].factors["K"].dense()
        train(model, opt, 1, data=lambda _: batch(t))  # noqa: B023
        after = opt.preconditioner_factors()["0"].factors["K"].dense()
        changed.append(not torch.equal(before, after))
    assert changed == [True] * 3 + [False] * 7 + [True, False]


def test_warmup_is_on_by_default_only_with_grafting():
    def warmup(**hyper):
        opt = SINGD(mlp(), **hyper)
        return opt._config(opt.param_groups[0]).warmup

    assert warmup() == 0
    assert warmup(grafting="adam") == 20
    assert warmup(grafting="adam", warmup_steps=0) == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="warmup_steps"):
            SINGD(mlp(), warmup_steps=bad)
