"""singd.capture: row transforms against brute force, hooks, layer discovery."""

from __future__ import annotations

import pytest
import torch
from singd_reference import conv_patch_rows
from torch import nn

from singd.capture import (
    Capture,
    find_layers,
    grad_rows,
    input_rows,
    loss_average_count,
    unwrap_model,
)

CONVS = [
    dict(in_channels=2, out_channels=4, kernel_size=3),
    dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(2, 3), dilation=(2, 1), padding=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, bias=False, stride=(1, 2)),
]


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_input_rows_expand_equal_explicit_patches(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(3, kwargs["in_channels"], 7, 6, dtype=torch.float64)
    rows = input_rows(conv, x, "expand")
    patches = conv_patch_rows(conv, x)
    ref = patches.reshape(-1, patches.shape[-1])
    if conv.bias is not None:
        ref = torch.cat([ref, torch.ones(ref.shape[0], 1, dtype=ref.dtype)], 1)
    assert rows.shape == ref.shape
    torch.testing.assert_close(rows.T @ rows, ref.T @ ref)


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_input_rows_reduce_average_patches_over_positions(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    x = torch.randn(3, kwargs["in_channels"], 7, 6, dtype=torch.float64)
    rows = input_rows(conv, x, "reduce")
    patches = conv_patch_rows(conv, x).mean(dim=(1, 2))
    ref = patches.reshape(-1, patches.shape[-1])
    if conv.bias is not None:
        ref = torch.cat([ref, torch.ones(ref.shape[0], 1, dtype=ref.dtype)], 1)
    torch.testing.assert_close(rows, ref)


def test_conv_rows_with_string_padding_and_reflect_mode_match_the_layer_output():
    """a W^T reproduces the conv output, so the patches are the ones the layer used."""
    torch.manual_seed(0)
    for conv in (
        nn.Conv2d(2, 3, 3, padding="same", bias=False),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
        nn.Conv2d(2, 3, 3, padding="valid", bias=False),
    ):
        x = torch.randn(2, 2, 5, 5)
        out = conv(x)
        rows = input_rows(conv, x, "expand")
        pred = rows @ conv.weight.reshape(3, -1).T
        torch.testing.assert_close(pred, out.permute(0, 2, 3, 1).reshape(-1, 3), atol=1e-5, rtol=0)


def test_conv_grad_rows_expand_transpose_and_reduce_sum():
    conv = nn.Conv2d(2, 3, 3)
    g = torch.randn(4, 3, 5, 6)
    e = grad_rows(conv, g, "expand")
    assert e.shape == (4 * 30, 3)
    torch.testing.assert_close(e[7], g[0, :, 1, 1])
    torch.testing.assert_close(grad_rows(conv, g, "reduce"), g.sum(dim=(2, 3)))


def test_linear_rows_with_leading_dims_expand_flatten_and_reduce_average():
    lin = nn.Linear(4, 3)
    x = torch.randn(2, 5, 6, 4)
    g = torch.randn(2, 5, 6, 3)
    a = input_rows(lin, x, "expand")
    assert a.shape == (60, 5)
    assert torch.all(a[:, -1] == 1)
    torch.testing.assert_close(a[:, :4], x.reshape(-1, 4))
    torch.testing.assert_close(input_rows(lin, x, "reduce")[:, :4], x.reshape(2, -1, 4).mean(1))
    torch.testing.assert_close(grad_rows(lin, g, "expand"), g.reshape(-1, 3))
    torch.testing.assert_close(grad_rows(lin, g, "reduce"), g.reshape(2, -1, 3).sum(1))


def test_loss_average_count_is_batch_or_batch_times_sequence():
    lin, conv = nn.Linear(4, 3), nn.Conv2d(1, 2, 3)
    g = torch.zeros(2, 5, 6, 3)
    assert loss_average_count(lin, g, None) == 1
    assert loss_average_count(lin, g, "batch") == 2
    assert loss_average_count(lin, g, "batch+sequence") == 60
    gc = torch.zeros(7, 2, 4, 5)
    assert loss_average_count(conv, gc, "batch") == 7
    assert loss_average_count(conv, gc, "batch+sequence") == 140


def test_capture_sees_the_output_gradient_before_an_inplace_relu():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin, nn.ReLU(inplace=True), nn.Linear(4, 2))
    seen = []
    cap = Capture({"0": lin}, lambda name, x, g: seen.append((name, x, g)))
    cap.attach(["0"])
    x = torch.randn(5, 3)
    model(x).square().sum().backward()
    cap.detach()
    # reference without in-place ops
    out = lin(x)
    out.retain_grad()
    torch.relu(out).matmul(model[2].weight.T).add(model[2].bias).square().sum().backward()
    assert len(seen) == 1 and seen[0][0] == "0"
    torch.testing.assert_close(seen[0][1], x)
    torch.testing.assert_close(seen[0][2], out.grad)


def test_capture_detach_leaves_no_hook_and_skips_no_grad_forwards():
    lin = nn.Linear(3, 4)
    calls = []
    cap = Capture({"l": lin}, lambda *args: calls.append(args))
    cap.attach(["l"])
    assert len(lin._forward_hooks) == 1
    with torch.no_grad():
        lin(torch.randn(2, 3))
    assert cap.fired == set()
    cap.detach()
    assert len(lin._forward_hooks) == 0
    lin(torch.randn(2, 3)).sum().backward()
    assert calls == []


def test_find_layers_leaves_mha_out_proj_tied_and_other_params_to_the_fallback():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.attn = nn.MultiheadAttention(4, 2)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.body = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(1))

    net = Net()
    search = find_layers(net, net.parameters())
    assert set(search.layers) == {"body"}
    assert "attn.out_proj.weight" in search.others
    assert "attn.in_proj_weight" in search.others
    assert "scale" in search.others and "norm.weight" in search.others
    assert "emb.weight" in search.others
    assert "out_proj" in search.others["attn.out_proj.weight"][1]


def test_unwrap_model_strips_data_parallel_and_compile_wrappers():
    lin = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(lin)) is lin
    compiled = torch.compile(lin, backend="eager")
    assert unwrap_model(compiled) is lin
