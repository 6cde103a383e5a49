"""SINGD's dtypes: per-factor preconditioner_dtype, autocast, models and groups that
change dtype."""

from __future__ import annotations

import pytest
import torch
from optimizer_helpers import FAST, batch, mlp, train

from singd import SINGD


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
