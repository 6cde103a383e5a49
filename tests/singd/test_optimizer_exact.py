"""SINGD against an independent dense reference (tests/singd/singd_reference.py) and IKFAC's
fixed point: the fast structured path must compute exactly SINGD's update (docs/architecture.md,
'singd: the optimizer')."""

from __future__ import annotations

import pytest
import torch
from singd_reference import ReferenceSINGD
from torch import nn

from singd import SINGD

STRUCTURES = [
    "dense",
    "diagonal",
    "block3diagonal",
    "hierarchical2_3",
    "triltoeplitz",
    "triutoeplitz",
    "tril",
    "triu",
    "triltopleftdiag",
    "trilbottomrightdiag",
    "triutopleftdiag",
    "triubottomrightdiag",
]


def small_cnn() -> nn.Module:
    """Conv (stride, padding, dilation, groups, with/without bias) + Linear, float64."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 6, 2, stride=1, padding=1, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 7),
        nn.Tanh(),
        nn.Linear(7, 3, bias=False),
    ).double()


def run_pair(make_model, data, steps, **hyper):
    """Train a SINGD copy and a reference copy of the same model; return both models."""
    torch.manual_seed(0)
    model = make_model()
    ref_model = make_model()
    ref_model.load_state_dict(model.state_dict())
    # the reference is the unguarded math; these runs use lr_cov up to 0.5, where the factor
    # update's guard (beta1 ||m||_F <= 1 by default) is active (tests/singd/test_guard.py)
    opt = SINGD(model, **({"guard": None} | hyper))
    ref = ReferenceSINGD(ref_model, **hyper)
    for t in range(steps):
        X, y = data(t)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad() if o is opt else m.zero_grad()
            loss = nn.functional.cross_entropy(m(X), y)
            loss.backward()
            o.step()
    return model, ref_model, opt


def cnn_data(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(5, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (5,), generator=g
    )


def assert_same_params(model, ref_model, rtol=1e-7, atol=1e-9):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"parameter {name} differs")


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("alpha1", [0.0, 0.5])
@pytest.mark.parametrize("name", STRUCTURES)
def test_structured_path_equals_dense_reference_over_20_steps(name, T, alpha1):
    hyper = dict(
        lr=0.05,
        lr_cov=0.1,
        damping=0.1,
        momentum=0.9,
        weight_decay=0.01,
        alpha1=alpha1,
        T=T,
        structures=(name, name),
    )
    model, ref_model, opt = run_pair(small_cnn, cnn_data, 20, **hyper)
    # the factors moved away from the identity, so the comparison is not vacuous
    K = opt.preconditioner_factors()["4"].factors["K"].dense()
    assert (K - torch.eye(K.shape[0], dtype=K.dtype)).abs().max() > 1e-3
    assert_same_params(model, ref_model)


@pytest.mark.parametrize(
    "options",
    [
        dict(kfac_like=True, alpha1=0.0),
        dict(normalize_lr_cov=True, alpha1=0.5, lr_cov=0.5),
        dict(lr_cov=lambda step: 0.3 / (1 + step)),
        dict(structures=("hierarchical2_3", "block4diagonal")),
        dict(structures=("tril", "diagonal"), loss_average=None),
        dict(kfac_approx="reduce", loss_average="batch+sequence"),
        dict(kfac_approx="expand", loss_average="batch+sequence"),
        # diagonal K and C of all layers take one batched (foreach) update
        dict(kfac_like=True, alpha1=0.0, structures=("diagonal", "diagonal")),
        dict(normalize_lr_cov=True, alpha1=0.5, lr_cov=0.5, structures=("diagonal", "diagonal")),
        # "reduce" statistics are finished Pi(F^T a^T a F), not raw column sums of squares
        dict(kfac_approx="reduce", alpha1=0.5, structures=("diagonal", "diagonal")),
    ],
    ids=[
        "ikfac",
        "normalize_lr_cov",
        "callable_lr_cov",
        "mixed",
        "loss_none",
        "reduce",
        "bs",
        "diagonal_ikfac",
        "diagonal_normalize_lr_cov",
        "diagonal_reduce",
    ],  # fmt: skip
)
def test_options_equal_dense_reference(options):
    hyper = dict(lr=0.05, lr_cov=0.1, damping=0.1, weight_decay=0.01, T=2) | options
    model, ref_model, _ = run_pair(small_cnn, cnn_data, 12, **hyper)
    assert_same_params(model, ref_model)


class SeqNet(nn.Module):
    """Linear layers on (batch, seq, features) inputs: weight sharing over the sequence."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).mean(1)


def seq_data(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(6, 4, 2, 4, generator=g, dtype=torch.float64).reshape(6, 8, 4), (
        torch.randint(0, 3, (6,), generator=g)
    )


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_linear_with_leading_dims_equals_reference(kfac_approx, loss_average):
    hyper = dict(
        lr=0.1, lr_cov=0.2, T=1, kfac_approx=kfac_approx, loss_average=loss_average, alpha1=0.3
    )
    model, ref_model, _ = run_pair(lambda: SeqNet().double(), seq_data, 8, **hyper)
    assert_same_params(model, ref_model)


def test_ikfac_fixed_point_is_damped_kfac_inverse():
    """kfac_like=True, dense, fixed batch, lr=0: K K^T -> (a^T a + damping I)^-1, C likewise."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    X = torch.randn(16, 4, dtype=torch.float64)
    target = torch.randn(16, 3, dtype=torch.float64)
    damping = 0.1
    opt = SINGD(
        layer, lr=0.0, lr_cov=0.3, damping=damping, kfac_like=True, alpha1=0.0, T=1, momentum=0.0
    )
    for _ in range(400):
        opt.zero_grad()
        out = layer(X)
        out.retain_grad()
        nn.functional.mse_loss(out, target).backward()
        opt.step()
    a = torch.cat([X, torch.ones(16, 1, dtype=X.dtype)], 1) / 16**0.5
    g = out.grad * 16**0.5
    factors = opt.preconditioner_factors()[""].factors
    K, C = factors["K"].dense(), factors["C"].dense()
    eye = torch.eye
    torch.testing.assert_close(
        K @ K.T, torch.linalg.inv(a.T @ a + damping * eye(5, dtype=X.dtype)), rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(
        C @ C.T, torch.linalg.inv(g.T @ g + damping * eye(3, dtype=X.dtype)), rtol=1e-9, atol=1e-9
    )
