"""SINGD on nn.MultiheadAttention, nn.Embedding and transformers' Conv1D equals the dense
reference (tests/singd/singd_reference.py) run on the explicit Linear layers they are."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from singd_reference import ReferenceSINGD
from torch import nn

from singd import SINGD

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DT = torch.float64
#: The new layer kinds reach SINGD once singd/base.py and singd/optimizer.py take them.
needs_new_kinds = pytest.mark.skipif(
    "MultiheadAttention" not in getattr(SINGD, "LAYER_KINDS", ()),
    reason="SINGD does not take the new layer kinds yet (base/optimizer integration pending)",
)
HYPER = dict(lr=0.05, lr_cov=0.1, damping=0.1, momentum=0.9, weight_decay=0.01, T=2)


def train(model, opt, batches, loss_fn):
    for inputs in batches:
        opt.zero_grad() if hasattr(opt, "param_groups") else model.zero_grad()
        loss_fn(model, *inputs).backward()
        opt.step()


# ---------------------------------------------------------------------- attention
class LinearAttention(nn.Module):
    """nn.MultiheadAttention's math with the projections as separate nn.Linear layers."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        E, self.heads = mha.embed_dim, mha.num_heads
        bias = mha.in_proj_bias is not None
        for i, r in enumerate("qkv"):
            w = getattr(mha, f"{r}_proj_weight")
            w = mha.in_proj_weight[i * E : (i + 1) * E] if w is None else w
            lin = nn.Linear(w.shape[1], E, bias=bias).to(DT)
            with torch.no_grad():
                lin.weight.copy_(w)
                if bias:
                    lin.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            setattr(self, r, lin)
        self.out = nn.Linear(E, E, bias=bias).to(DT)
        self.out.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value):  # batch first
        B, L, E = query.shape
        hd = E // self.heads

        def heads(t):
            return t.reshape(B, -1, self.heads, hd).transpose(1, 2)

        q, k, v = heads(self.q(query)), heads(self.k(key)), heads(self.v(value))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1)
        return self.out((att @ v).transpose(1, 2).reshape(B, L, E))


def attention_params(mha: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """The MHA's projections as (q, k, v, out) weights and biases."""
    E = mha.embed_dim
    out = {}
    for i, r in enumerate("qkv"):
        w = getattr(mha, f"{r}_proj_weight")
        out[f"{r}.weight"] = mha.in_proj_weight[i * E : (i + 1) * E] if w is None else w
        if mha.in_proj_bias is not None:
            out[f"{r}.bias"] = mha.in_proj_bias[i * E : (i + 1) * E]
    out["out.weight"] = mha.out_proj.weight
    if mha.out_proj.bias is not None:
        out["out.bias"] = mha.out_proj.bias
    return out


ATTENTION_CASES = [
    dict(batch_first=True, bias=True, mode="self"),
    dict(batch_first=False, bias=True, mode="kv"),
    dict(batch_first=False, bias=False, mode="three", kdim=6, vdim=5),
    dict(batch_first=True, bias=True, mode="three", kdim=6, vdim=5),
]


@needs_new_kinds
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize(
    "options",
    [dict(), dict(structures=("block3diagonal", "diagonal"), kfac_approx="reduce")],
    ids=["dense", "structured-reduce"],
)
def test_attention_update_equals_reference_on_explicit_linear_projections(case, options):
    case = dict(case)
    mode, bf = case.pop("mode"), case["batch_first"]
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **case).to(DT)
    ref = LinearAttention(mha)
    kd, vd = case.get("kdim", 8), case.get("vdim", 8)

    def batches():
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            q = torch.randn(3, 4, 8, generator=g, dtype=DT)
            k = torch.randn(3, 5, kd, generator=g, dtype=DT)
            v = k if mode == "kv" else torch.randn(3, 5, vd, generator=g, dtype=DT)
            k, v = (q, q) if mode == "self" else (k, v)
            yield q, k, v, torch.randn(3, 4, 8, generator=g, dtype=DT)

    def loss_mha(m, q, k, v, target):
        if not bf:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            q = q if mode != "self" else k
            v = k if mode != "three" else v
        y = m(q, k, v, need_weights=False)[0]
        y = y if bf else y.transpose(0, 1)
        return F.mse_loss(y.tanh(), target)

    def loss_ref(m, q, k, v, target):
        return F.mse_loss(m(q, k, v).tanh(), target)

    hyper = HYPER | options
    opt = SINGD(mha, warn_unsupported=False, **hyper)
    assert sorted(opt.preconditioner_factors()) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    train(mha, opt, batches(), loss_mha)
    train(ref, ReferenceSINGD(ref, **hyper), batches(), loss_ref)
    K = opt.preconditioner_factors()["q_proj"].factors["K"].dense()
    assert (K - torch.eye(K.shape[0], dtype=DT)).abs().max() > 1e-3
    for name, p in attention_params(mha).items():
        torch.testing.assert_close(p, ref.get_parameter(name), msg=name)


# ---------------------------------------------------------------------- embedding
@needs_new_kinds
@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("c_structure", ["dense", "diagonal"])
def test_embedding_update_equals_reference_on_one_hot_linear_with_diagonal_k(
    padding_idx, c_structure
):
    """Whatever K structure the user picks, the embedding's K is diagonal (token counts)."""
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4, padding_idx=padding_idx).to(DT)
    lin = nn.Linear(7, 4, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)

    def one_hot(idx):
        x = F.one_hot(idx, 7).to(DT)
        if padding_idx is not None:
            x[..., padding_idx] = 0
        return x

    def batches():
        g = torch.Generator().manual_seed(2)
        for _ in range(6):
            yield torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 4, (5,), generator=g)

    opt = SINGD(emb, **HYPER, structures=("dense", c_structure))
    train(emb, opt, batches(), lambda m, i, y: F.cross_entropy(m(i).sum(1), y))
    ref = ReferenceSINGD(lin, **HYPER, structures=("diagonal", c_structure))
    train(lin, ref, batches(), lambda m, i, y: F.cross_entropy(m(one_hot(i)).sum(1), y))
    (layer,) = opt.preconditioner_factors().values()
    assert layer.module_type == "Embedding" and layer.factors["K"].structure == "diagonal"
    torch.testing.assert_close(emb.weight, lin.weight.T)


# ---------------------------------------------------------------------- Conv1D
@needs_new_kinds
def test_conv1d_update_equals_reference_on_its_linear():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    convs = nn.Sequential(pytorch_utils.Conv1D(5, 3), nn.Tanh(), pytorch_utils.Conv1D(2, 5))
    convs = convs.to(DT)
    lins = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    with torch.no_grad():
        for c, lin in ((convs[0], lins[0]), (convs[2], lins[2])):
            lin.weight.copy_(c.weight.T)
            lin.bias.copy_(c.bias)

    def batches():
        g = torch.Generator().manual_seed(3)
        for _ in range(6):
            yield (
                torch.randn(4, 6, 3, generator=g, dtype=DT),
                torch.randint(0, 2, (4,), generator=g),
            )

    def loss(m, x, y):
        return F.cross_entropy(m(x).mean(1), y)

    opt = SINGD(convs, **HYPER)
    assert {f.module_type for f in opt.preconditioner_factors().values()} == {"Conv1D"}
    train(convs, opt, batches(), loss)
    train(lins, ReferenceSINGD(lins, **HYPER), batches(), loss)
    for c, lin in ((convs[0], lins[0]), (convs[2], lins[2])):
        torch.testing.assert_close(c.weight, lin.weight.T)
        torch.testing.assert_close(c.bias, lin.bias)


def test_tied_embedding_and_head_get_one_fallback_update():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(4, 4), head)
    before = emb.weight.detach().clone()
    with pytest.warns(UserWarning, match="shared by several modules"):
        opt = SINGD(model, lr=0.1, momentum=0.0, fallback="heavy_ball")
    assert list(opt.fallback_parameters()) == ["0.weight"]
    idx = torch.randint(0, 6, (3, 5))
    F.cross_entropy(model(idx).reshape(-1, 6), idx.reshape(-1)).backward()
    grad = emb.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(emb.weight, before - 0.1 * grad)
