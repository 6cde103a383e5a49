"""SINGD on whole models and wrappers: a CNN, torch.compile, DistributedDataParallel."""

from __future__ import annotations

import pytest
import torch
from optimizer_helpers import FAST, flat, mlp, train
from torch import nn

from singd import SINGD


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
