"""singd.capture on nn.MultiheadAttention: the rows read from the autograd graph equal those
of an explicit forward with separate projections, for every layout of the module."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
from attention_reference import explicit_attention, projection_weights
from torch import nn

from singd.capture import LAYER_KINDS, Capture, _projection_products, find_layers

DT = torch.float64

# (batch_first, bias, (kdim, vdim) or None, inputs): "self" q=k=v, "kv" k=v, "three" all differ
CASES = [
    (bf, bias, dims, mode)
    for bf, bias, dims, mode in itertools.product(
        (False, True), (True, False), (None, (6, 5)), ("self", "kv", "three")
    )
    if not (dims is not None and mode != "three")
]


def make(bf: bool, bias: bool, dims, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    kdim, vdim = dims or (None, None)
    return nn.MultiheadAttention(8, 2, bias=bias, batch_first=bf, kdim=kdim, vdim=vdim).to(DT)


def inputs(bf: bool, dims, mode: str, batch: int | None = 3):
    kdim, vdim = dims or (8, 8)

    def rand(L, d):
        shape = (L, d) if batch is None else ((batch, L, d) if bf else (L, batch, d))
        return torch.randn(*shape, dtype=DT)

    q = rand(4, 8).requires_grad_()
    if mode == "self":
        return q, q, q
    if mode == "kv":
        k = rand(5, kdim)
        return q, k, k
    return q, rand(5, kdim), rand(5, vdim)


def capture_all(m: nn.Module):
    """A Capture attached to every layer find_layers returns; the captured (x, g) by name."""
    search = find_layers(m, m.parameters(), LAYER_KINDS)
    got: dict[str, list] = {}
    cap = Capture(
        {n: layer.module for n, layer in search.layers.items()},
        lambda n, x, g: got.setdefault(n, []).append((x, g)),
    )
    cap.attach(search.layers)
    return search, cap, got


@pytest.mark.parametrize("bf,bias,dims,mode", CASES)
def test_attention_rows_equal_the_explicit_projections_inputs_and_output_gradients(
    bf, bias, dims, mode
):
    m = make(bf, bias, dims)
    q, k, v = inputs(bf, dims, mode)
    search, _, got = capture_all(m)
    assert sorted(search.layers) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert not search.others
    y, _ = m(q, k, v, need_weights=mode == "kv")
    R = torch.randn_like(y)
    (y * R).sum().backward()
    y_ref, io = explicit_attention(m, q, k, v)
    torch.testing.assert_close(y, y_ref)
    (y_ref * R).sum().backward()
    for name in search.layers:
        (x, g), *more = got[name]
        assert not more, f"{name} captured twice"
        x_ref, out_ref = io[name.split("_")[0]]
        torch.testing.assert_close(x, x_ref, msg=f"{name}: input rows")
        torch.testing.assert_close(g, out_ref.grad, msg=f"{name}: output-gradient rows")


@pytest.mark.parametrize("bf,bias,dims,mode", CASES)
def test_attention_rows_reproduce_each_projections_weight_and_bias_gradient(bf, bias, dims, mode):
    """sum_r g_r [a_r, 1]^T is [grad W, grad b] of the layer's block of the parameters."""
    m = make(bf, bias, dims)
    q, k, v = inputs(bf, dims, mode)
    search, _, got = capture_all(m)
    y, _ = m(q, k, v, need_weights=False)
    (y.sin()).sum().backward()
    for name, layer in search.layers.items():
        ((x, g),) = got[name]
        a = x.reshape(-1, x.shape[-1])
        if layer.bias is not None:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], 1)
        G = g.reshape(-1, g.shape[-1]).T @ a
        torch.testing.assert_close(G, layer.grad_matrix(), msg=name)
        assert G.shape == (layer.out_dim, layer.in_dim)


def test_unbatched_attention_rows_are_two_dimensional_and_exact():
    m = make(False, True, None)
    q, k, v = inputs(False, None, "three", batch=None)
    _, _, got = capture_all(m)
    y, _ = m(q, k, v)
    R = torch.randn_like(y)
    (y * R).sum().backward()
    y_ref, io = explicit_attention(m, q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
    (y_ref.squeeze(1) * R).sum().backward()
    for name, [(x, g)] in got.items():
        x_ref, out_ref = io[name.split("_")[0]]
        assert x.dim() == 2 and g.dim() == 2
        torch.testing.assert_close(x, x_ref.squeeze(0))
        torch.testing.assert_close(g, out_ref.grad.squeeze(0))


@pytest.mark.parametrize("bf,bias,dims,mode", CASES[::3])
def test_capture_leaves_attention_outputs_and_state_dict_keys_unchanged(bf, bias, dims, mode):
    m = make(bf, bias, dims)
    keys = list(m.state_dict())
    q, k, v = inputs(bf, dims, mode)
    y0, w0 = m(q, k, v)
    _, cap, _ = capture_all(m)
    y1, w1 = m(q, k, v)
    assert torch.equal(y0, y1) and torch.equal(w0, w1)
    assert list(m.state_dict()) == keys
    cap.detach()
    assert not m._forward_hooks


def test_dropout_masks_and_key_padding_are_captured_exactly():
    """Training-mode dropout, a float attention mask and a key padding mask: the rows still
    reproduce the gradients (the graph walk does not depend on the attention's internals)."""
    torch.manual_seed(1)
    m = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True, add_bias_kv=True).to(DT)
    x = torch.randn(3, 4, 8, dtype=DT)
    mask = torch.randn(4, 4, dtype=DT)
    pad = torch.tensor([[False, False, False, True]] * 3)
    search, _, got = capture_all(m)
    assert set(search.others) == {"bias_k", "bias_v"}
    y, _ = m(x, x, x, attn_mask=mask, key_padding_mask=pad)
    y.square().sum().backward()
    for name, layer in search.layers.items():
        ((xr, g),) = got[name]
        a = torch.cat([xr.reshape(-1, 8), torch.ones(xr.shape[0] * xr.shape[1], 1, dtype=DT)], 1)
        torch.testing.assert_close(g.reshape(-1, g.shape[-1]).T @ a, layer.grad_matrix())


def test_graph_walk_stops_at_the_attention_inputs():
    """An upstream Linear (a matmul with a parameter) is not visited by the walk."""
    torch.manual_seed(0)
    pre = nn.Linear(8, 8).to(DT)
    m = make(True, True, None)
    x = pre(torch.randn(2, 3, 8, dtype=DT))
    y, _ = m(x, x, x, need_weights=False)
    found = _projection_products([y.grad_fn], {x.grad_fn})
    params = {id(p) for p in m.parameters()}
    assert found and all(id(p) in params for _, _, p, _, _ in found)
    everything = _projection_products([y.grad_fn], set())
    assert any(p is pre.weight for _, _, p, _, _ in everything)  # the stop is what bounds it


@pytest.mark.parametrize("backward", [True, False])
def test_captured_rows_do_not_outlive_the_graph(backward):
    """The pre-hooks hold the saved projection inputs only as long as autograd's graph
    (also when no backward runs): the attention's input dies with the outputs."""
    m = make(False, True, None)
    q, k, v = inputs(False, None, "three")
    _, _, got = capture_all(m)
    h = q * 2.0  # a non-leaf input: the q projection's saved input is a view of it
    alive = weakref.ref(h)
    y, weights = m(h, k, v)
    loss = y.sum() + weights.sum()
    del h
    if backward:
        loss.backward()
        assert len(got) == 4
    got.clear()
    del y, weights, loss
    gc.collect()
    assert alive() is None


def test_detached_capture_stops_calling_back_and_projection_weights_are_views():
    m = make(False, True, None)
    _, cap, got = capture_all(m)
    cap.attach(["q_proj"])
    q, k, v = inputs(False, None, "self")
    m(q, k, v)[0].sum().backward()
    assert set(got) == {"q_proj"}
    cap.detach()
    got.clear()
    m(q, k, v)[0].sum().backward()
    assert not got and not m._forward_hooks
    W = projection_weights(m)
    assert W["k"][0].data_ptr() == m.in_proj_weight[8:].data_ptr()
