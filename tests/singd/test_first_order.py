"""The first-order rules: Adam directions as torch's AdamW takes them, compensated updates."""

from __future__ import annotations

import pytest
import torch

from singd.first_order import adam_directions_, add_, moment_dtype


def test_adam_directions_with_decoupled_decay_reproduce_torch_adamw():
    torch.manual_seed(0)
    lr, wd, betas, eps = 1e-2, 0.1, (0.9, 0.99), 1e-8
    ours = [torch.randn(5, 3), torch.randn(7)]
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    reference = torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    for step in range(1, 8):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        reference.step()
        directions = adam_directions_(grads, m, v, step=step, betas=betas, eps=eps)
        torch._foreach_add_(directions, ours, alpha=wd)
        add_(ours, directions, alpha=-lr)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_adam_moments_of_a_bf16_parameter_are_float32():
    assert moment_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert moment_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compensated_low_precision_parameter_accumulates_updates_below_half_an_ulp(dtype):
    steps, delta = 1000, 1e-4  # far below half an ulp of 1.0 in either dtype
    plain = torch.ones(4, dtype=dtype)
    compensated = torch.ones(4, dtype=dtype)
    comp = torch.zeros(4, dtype=dtype)
    wide = torch.ones(4, dtype=torch.float32)
    update = torch.full((4,), delta, dtype=dtype)
    for _ in range(steps):
        add_([plain], [update], alpha=1.0)
        add_([compensated], [update], alpha=1.0, compensations=[comp])
        add_([wide], [update.float()], alpha=1.0)
    ulp = torch.finfo(dtype).eps * 2  # the ulp just above 1.0 is eps; around 1.1 it is eps too
    assert torch.equal(plain, torch.ones(4, dtype=dtype))  # every plain update was lost
    assert (compensated.float() - wide).abs().max() <= ulp
    assert wide[0] > 1.09  # the intended change is about 0.1, many ulps


def test_compensated_update_matches_a_plain_one_when_rounding_loses_nothing():
    p = torch.tensor([1.0, 2.0, -4.0], dtype=torch.bfloat16)
    q = p.clone()
    comp = torch.zeros_like(p)
    u = torch.tensor([0.5, 0.25, 1.0], dtype=torch.bfloat16)
    add_([p], [u], alpha=-2.0)
    add_([q], [u], alpha=-2.0, compensations=[comp])
    assert torch.equal(p, q) and torch.equal(comp, torch.zeros_like(comp))
