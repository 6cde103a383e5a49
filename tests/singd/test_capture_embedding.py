"""singd.capture on nn.Embedding and transformers' Conv1D: both are the Linear layers they
act as (one-hot input / transposed weight), tied weights go to the fallback once."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from singd.capture import (
    LAYER_KINDS,
    Capture,
    find_layers,
    grad_rows,
    input_rows,
    input_square_sums,
    is_conv1d,
    loss_average_count,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
DT = torch.float64


def captured(module: nn.Module, *args):
    """(layer, x, grad_output) of one forward/backward of ``module`` through Capture."""
    search = find_layers(module, module.parameters(), LAYER_KINDS)
    ((name, layer),) = search.layers.items()
    got = []
    cap = Capture({name: layer.module}, lambda n, x, g: got.append((x, g)))
    cap.attach([name])
    y = module(*args)
    R = torch.randn_like(y)
    (y * R).sum().backward()
    ((x, g),) = got
    return layer, x, g, y, R


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_embedding_rows_are_one_hot_and_reproduce_its_gradient(padding_idx, approx):
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4, padding_idx=padding_idx).to(DT)
    idx = torch.randint(0, 7, (3, 5))
    idx[0, 0] = 2
    layer, x, g, _, _ = captured(emb, idx)
    assert (layer.kind, layer.k_structure, layer.in_dim, layer.out_dim) == (
        "Embedding",
        "diagonal",
        7,
        4,
    )
    onehot = torch.nn.functional.one_hot(idx, 7).to(DT)
    if padding_idx is not None:
        onehot[..., padding_idx] = 0  # the padding row gets no gradient
    a = input_rows(emb, x, approx)
    if approx == "expand":
        torch.testing.assert_close(a, onehot.reshape(-1, 7))
        # Linear-equivalent: grad of W^T (4 x 7) is sum_r g_r a_r^T
        torch.testing.assert_close(grad_rows(emb, g, approx).T @ a, layer.grad_matrix())
    else:
        torch.testing.assert_close(a, onehot.mean(1))
    sq, rows = input_square_sums(emb, x, DT)
    torch.testing.assert_close(sq, onehot.reshape(-1, 7).square().sum(0))
    assert rows == 15
    assert loss_average_count(emb, g, "batch") == 3
    assert loss_average_count(emb, g, "batch+sequence") == 15


def test_embedding_split_and_diagonal_scales_match_its_transposed_weight():
    torch.manual_seed(0)
    emb = nn.Embedding(6, 3).to(DT)
    layer, *_ = captured(emb, torch.randint(0, 6, (2, 4)))
    D = torch.randn(3, 6, dtype=DT)
    (w,) = layer.split(D)
    assert w.shape == emb.weight.shape
    torch.testing.assert_close(w, D.T)
    left, right = torch.rand(3, dtype=DT), torch.rand(6, dtype=DT)
    (lw,), (rw,) = layer.diagonal_scales(left, right)
    scaled = torch.diag(left) @ layer.grad_matrix() @ torch.diag(right)
    torch.testing.assert_close(lw * emb.weight.grad * rw, scaled.T)


def test_conv1d_is_detected_without_importing_transformers_and_rows_equal_its_linear():
    torch.manual_seed(0)
    conv = pytorch_utils.Conv1D(5, 3).to(DT)  # nf=5 outputs, nx=3 inputs; weight (3, 5)
    assert is_conv1d(conv)
    lookalike = type("Conv1D", (nn.Linear,), {"__module__": "mypackage.layers"})(3, 5)
    assert not is_conv1d(lookalike)
    lin = nn.Linear(3, 5).to(DT)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    x = torch.randn(2, 4, 3, dtype=DT)
    layer, xc, gc_, y, R = captured(conv, x)
    y_lin = lin(x)
    torch.testing.assert_close(y, y_lin)
    (y_lin * R).sum().backward()
    assert (layer.kind, layer.in_dim, layer.out_dim, layer.transposed) == ("Conv1D", 4, 5, True)
    torch.testing.assert_close(input_rows(conv, xc), input_rows(lin, x))
    torch.testing.assert_close(grad_rows(conv, gc_), grad_rows(lin, gc_))
    G_lin = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    torch.testing.assert_close(layer.grad_matrix(), G_lin)
    w, b = layer.split(G_lin)
    assert w.shape == conv.weight.shape and b.shape == conv.bias.shape
    torch.testing.assert_close(w, conv.weight.grad)
    torch.testing.assert_close(b, conv.bias.grad)


def test_tied_embedding_and_head_go_to_the_fallback_once_with_a_reason():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(4, 4), head)
    search = find_layers(model, model.parameters(), LAYER_KINDS)
    assert set(search.layers) == {"1"}
    assert list(search.others) == ["0.weight"]
    assert search.others["0.weight"][1] == "shared by several modules"


def test_sparse_and_frequency_scaled_embeddings_fall_back_with_their_reason():
    model = nn.Sequential(
        nn.Embedding(5, 3, sparse=True),
        nn.Embedding(5, 3, scale_grad_by_freq=True),
        nn.Embedding(5, 3, max_norm=1.0),
    )
    search = find_layers(model, model.parameters(), LAYER_KINDS)
    assert set(search.layers) == {"2"}
    assert "sparse" in search.others["0.weight"][1]
    assert "scale_grad_by_freq" in search.others["1.weight"][1]


def test_basic_kinds_leave_new_layer_kinds_to_the_fallback():
    model = nn.Sequential(
        nn.Embedding(5, 8), nn.MultiheadAttention(8, 2), pytorch_utils.Conv1D(3, 8)
    )
    search = find_layers(model, model.parameters())
    assert not search.layers
    assert set(search.others) == {
        "0.weight",
        "1.in_proj_weight",
        "1.in_proj_bias",
        "1.out_proj.weight",
        "1.out_proj.bias",
        "2.weight",
        "2.bias",
    }
    with pytest.raises(ValueError, match="kinds"):
        find_layers(model, model.parameters(), ["Bilinear"])
