"""experiments.real_models: the real-model workloads build offline and deterministically, every
Linear-like parameter is in a preconditioned layer, and SINGD trains each of them."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from experiments.real_models import (  # noqa: E402
    REAL_WORKLOADS,
    build_real_workload,
    entropy_rate_bound,
    markov_language,
)
from singd import SINGD  # noqa: E402
from singd.capture import LAYER_KINDS, find_layers, is_conv1d  # noqa: E402

#: Linear-like parameters each workload leaves to the fallback on purpose, with the reason.
EXPECTED_FALLBACK = {"gpt2": {"transformer.wte.weight": "shared by several modules"}}


def linear_like(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the modules SINGD can precondition (qualified name -> parameter)."""
    kinds = (nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention)
    out, seen = {}, set()
    for mname, m in model.named_modules():
        if isinstance(m, kinds) or is_conv1d(m):
            for pname, p in m.named_parameters(recurse=False):
                if id(p) not in seen and pname not in ("bias_k", "bias_v"):
                    seen.add(id(p))  # a tied parameter under its first name
                    out[f"{mname}.{pname}" if mname else pname] = p
    return out


def test_markov_language_is_deterministic_and_sparse():
    a, b = markov_language(64, seed=3), markov_language(64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, markov_language(64, seed=4))
    pairs = torch.stack([a[:, :-1].reshape(-1), a[:, 1:].reshape(-1)], 1)
    successors = {int(t): set() for t in pairs[:, 0]}
    for t, n in pairs.tolist():
        successors[t].add(n)
    assert max(len(s) for s in successors.values()) <= 3
    assert entropy_rate_bound() < 0.3 * math.log(64)


@pytest.mark.parametrize("name", sorted(REAL_WORKLOADS))
def test_every_linear_like_parameter_of_each_workload_is_preconditioned(name):
    w = build_real_workload(name)
    search = find_layers(w.model, w.model.parameters(), LAYER_KINDS)
    covered = {id(p) for layer in search.layers.values() for p in layer.params()}
    left = {n: search.others[n][1] for n, p in linear_like(w.model).items() if id(p) not in covered}
    assert left == EXPECTED_FALLBACK.get(name, {})
    assert search.layers


@pytest.mark.parametrize("name", sorted(REAL_WORKLOADS))
def test_workloads_are_deterministic_per_seed(name):
    a, b = build_real_workload(name, seed=1), build_real_workload(name, seed=1)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a.train[0][0], b.train[0][0])
    assert math.isfinite(float(a.loss(a.train[0]))) and math.isfinite(a.evaluate())


def test_unknown_workload_name_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match="llama"):
        build_real_workload("bert")


@pytest.mark.skipif(
    "MultiheadAttention" not in getattr(SINGD, "LAYER_KINDS", ()),
    reason="SINGD does not take the new layer kinds yet (base/optimizer integration pending)",
)
@pytest.mark.parametrize("name", sorted(REAL_WORKLOADS))
def test_singd_preconditions_each_workload_and_its_loss_falls(name):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    w = build_real_workload(name)
    opt = SINGD(w.model, lr=0.02, damping=1e-2, T=2, warn_unsupported=False)
    fallback = {id(p) for p in opt.fallback_parameters().values()}
    left = {n for n, p in linear_like(w.model).items() if id(p) in fallback}
    assert left == set(EXPECTED_FALLBACK.get(name, {}))
    losses = []
    for _ in range(6):  # one fixed batch: its loss must fall within a few steps
        opt.zero_grad()
        loss = w.loss(w.train[0])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    assert set(opt.preconditioner_factors()) == set(
        find_layers(w.model, w.model.parameters(), LAYER_KINDS).layers
    )
