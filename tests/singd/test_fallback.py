"""SINGD's first-order fallback: parameters outside supported layers, its warning,
bypassed layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from optimizer_helpers import FAST, Zoo, flat, train
from torch import nn

from singd import SINGD


def test_fallback_trains_every_other_parameter_and_one_warning_lists_them():
    torch.manual_seed(0)
    model = Zoo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SINGD(model, **FAST)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    for name in ("norm.weight", "norm.bias", "bn.weight", "bn.bias", "gain"):
        assert name in messages[0]
    for name in ("emb.weight", "attn.in_proj_weight", "attn.out_proj.weight"):
        assert name not in messages[0]  # preconditioned layer kinds
    assert set(opt.preconditioner_factors()) == {
        "lin",
        "head",
        "emb",
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.out_proj",
    }
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
