"""Speed shortcuts (conv statistics, block Grams, row-wise Toeplitz products) agree with the
plain computation they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import singd.structures.toeplitz as toeplitz_module
from singd.capture import (
    conv_input_gram,
    conv_input_square_sums,
    conv_row_count,
    grad_square_sums,
    input_rows,
)
from singd.structures import structure
from singd.structures.base import symmetric_gram
from singd.update import diagonal_steps, precondition, riemannian_step

CONVS = {
    "same_reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding="same",
                         padding_mode="reflect"),
    "strided_dilated_groups_nobias": dict(in_channels=4, out_channels=6, kernel_size=(2, 3),
                                          stride=2, dilation=2, groups=2, bias=False),
    "circular_depthwise": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1,
                               padding_mode="circular", groups=4),
    "pointwise": dict(in_channels=3, out_channels=5, kernel_size=1),
    # more configs with >= NHWC_MIN_CHANNELS channels per group (rows built channels-last;
    # circular_depthwise has one channel per group: unfold)
    "nhwc_groups_strided_dilated_nobias": dict(in_channels=8, out_channels=6,
                                               kernel_size=(2, 3), stride=(2, 1),
                                               dilation=(1, 2), groups=2, bias=False),
    "nhwc_asymmetric_zero_padding": dict(in_channels=5, out_channels=3, kernel_size=(3, 2),
                                         padding=(1, 2)),
    "nhwc_strided_replicate": dict(in_channels=4, out_channels=2, kernel_size=3, padding=1,
                                 padding_mode="replicate", stride=2),
}  # fmt: skip


def _unfolded_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Reference expand rows (ones column with a bias) from ``F.unfold`` of the input padded
    as the layer pads it."""
    x = x if x.dim() == 4 else x.unsqueeze(0)
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    patches = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)
    B, _, L = patches.shape
    G = conv.groups
    rows = patches.reshape(B, G, -1, L).permute(0, 3, 1, 2).reshape(B * L * G, -1)
    if conv.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("cfg", CONVS.values(), ids=CONVS.keys())
def test_conv_rows_gram_and_square_sums_equal_those_of_the_unfolded_rows(cfg, batched):
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg).double()
    shape = (5, cfg["in_channels"], 9, 7) if batched else (cfg["in_channels"], 9, 7)
    x = torch.randn(shape, dtype=torch.float64)
    rows = _unfolded_rows(conv, x)
    torch.testing.assert_close(input_rows(conv, x), rows, rtol=0, atol=0)
    gram, count = conv_input_gram(conv, x, torch.float64)
    sums, count2 = conv_input_square_sums(conv, x, torch.float64)
    grad_output = torch.randn_like(conv(x))
    assert count == count2 == rows.shape[0] == conv_row_count(conv, grad_output)
    torch.testing.assert_close(gram, rows.T @ rows)
    torch.testing.assert_close(sums, (rows * rows).sum(0))
    g = grad_output if batched else grad_output.unsqueeze(0)
    g_rows = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    torch.testing.assert_close(grad_square_sums(conv, grad_output, torch.float64),
                               (g_rows * g_rows).sum(0))  # fmt: skip


@pytest.mark.parametrize("width", [5, 255, 256, 301])
def test_symmetric_gram_equals_the_full_product(width):
    torch.manual_seed(0)
    Y = torch.randn(40, width, dtype=torch.float64)
    out = symmetric_gram(Y)
    torch.testing.assert_close(out, Y.T @ Y)
    if width >= 256:  # block path: the off-diagonal blocks are mirrored copies
        h = (width + 1) // 2
        assert torch.equal(out[h:, :h], out[:h, h:].T)


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
def test_toeplitz_preconditioning_by_row_ffts_matches_dense_products(name, monkeypatch):
    monkeypatch.setattr(toeplitz_module, "_DENSE_BELOW", 128)  # both factors by FFT
    torch.manual_seed(0)
    S = structure(name)
    K, C = S.eye(200, torch.float64), S.eye(150, torch.float64)
    K.t.normal_()
    C.t.normal_()
    G = torch.randn(150, 200, dtype=torch.float64)
    Kd, Cd = K.to_dense(), C.to_dense()
    expected = Cd @ Cd.T @ G @ Kd @ Kd.T
    scale = expected.abs().max().item()
    torch.testing.assert_close(precondition(G, K, C), expected, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.parametrize("name", ["hierarchical3_2", "block4diagonal", "triltoeplitz", "dense"])
def test_small_factors_get_a_dense_gram_cache_whenever_it_is_reused(name):
    """With T > 1 every non-diagonal factor up to DENSE_GRAM_MAX caches a dense F F^T, even
    when the other factor is tiny; it equals the product it replaces."""
    from singd.update import DENSE_GRAM_MAX, gram

    torch.manual_seed(0)
    d = 40
    F = structure(name).from_dense(torch.randn(d, d, dtype=torch.float64))
    P = gram(F, other_dim=1, T=2)
    assert P is not None and P.kind == "dense"
    Fd = F.to_dense()
    torch.testing.assert_close(P.value, Fd @ Fd.T)
    big = structure(name).eye(DENSE_GRAM_MAX + 1, torch.float32, "cpu")
    assert gram(big, other_dim=1, T=2) is None  # building it costs more than it saves
    expected = {"dense": "dense", "block4diagonal": "structured"}.get(name)
    P = gram(big, other_dim=1000, T=2)
    assert (P and P.kind) == expected


def test_block_diagonal_keeps_block_grams_when_the_cache_lives_one_step():
    from singd.update import gram

    F = structure("block4diagonal").eye(10, torch.float32, "cpu")
    assert gram(F).kind == "structured"
    assert gram(structure("hierarchical3_2").eye(10, torch.float32, "cpu")) is None


@pytest.mark.parametrize("d", [3, 5, 12, 14])
@pytest.mark.parametrize("n", [2, 5, 40])
def test_block_statistic_from_gram_blocks_equals_the_projected_product(d, n):
    """With at least N columns the block statistic comes from the diagonal blocks of X X^T
    (no product with the factor first); both routes equal Pi(S^T X X^T S)."""
    torch.manual_seed(d * n)
    cls = structure("block5diagonal")
    S = cls.from_dense(torch.randn(d, d, dtype=torch.float64))
    rows = torch.randn(n, d, dtype=torch.float64)
    A = S.to_dense()
    expected = cls.from_dense(A.T @ rows.T @ rows @ A).to_dense()
    torch.testing.assert_close(S.from_inner(rows.T).to_dense(), expected)  # transposed view
    torch.testing.assert_close(S.from_inner(rows.T.contiguous()).to_dense(), expected)


@pytest.mark.parametrize("square_sums", [False, True], ids=["statistics", "square_sums"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(alpha1=0.0),
        dict(alpha1=0.5),
        dict(alpha1=0.5, normalize_lr_cov=True),
        dict(alpha1=0.0, kfac_like=True),
    ],
    ids=["plain", "momentum", "normalized", "kfac_like"],
)
def test_batched_diagonal_update_equals_the_generic_step_of_each_layer(opts, square_sums):
    """All-diagonal layers updated in one flat batch (different sizes and statistic scales)
    match the generic structured step run layer by layer on dense copies of the factors."""
    torch.manual_seed(0)
    dims = [(7, 3), (12, 12), (1, 5)]  # (d_K, d_C) per layer
    Diag, Dense = structure("diagonal"), structure("dense")
    scales_K, scales_C = [1.0, 0.5, 2.0], [3.0, 1.0, 0.25]

    def vec(d: int) -> torch.Tensor:
        return torch.rand(d, dtype=torch.float64) + 0.5

    layers = [[vec(a), vec(c), vec(a), vec(c), vec(a) - 1, vec(c) - 1] for a, c in dims]
    K, C, HK, HC, mK, mC = ([Diag(v.clone()) for v in col] for col in zip(*layers))
    kw = dict(damping=1e-2, lr_cov=0.3, **opts)
    momentum = opts["alpha1"] > 0
    squares = diagonal_steps(
        K, C, HK, HC, mK if momentum else None, mC if momentum else None,
        scales_K=scales_K, scales_C=scales_C, square_sums=square_sums, **kw,
    )  # fmt: skip
    for i, (k, c, hk, hc, mk, mc) in enumerate(layers):
        if square_sums:  # the batch multiplies the raw column sums by the squared entries
            hk, hc = hk * k * k, hc * c * c
        ref = [Dense(torch.diag(v)) for v in (k, c, hk, hc, mk, mc)]
        rK, rC, rmK, rmC = riemannian_step(
            *ref[:4], ref[4] if momentum else None, ref[5] if momentum else None,
            scale_K=scales_K[i], scale_C=scales_C[i], **kw,
        )  # fmt: skip
        torch.testing.assert_close(K[i].diag, torch.diagonal(rK.to_dense()))
        torch.testing.assert_close(C[i].diag, torch.diagonal(rC.to_dense()))
        torch.testing.assert_close(squares[i], K[i].diag ** 2)
        torch.testing.assert_close(squares[len(dims) + i], C[i].diag ** 2)
        if momentum:
            torch.testing.assert_close(mK[i].diag, torch.diagonal(rmK.to_dense()))
            torch.testing.assert_close(mC[i].diag, torch.diagonal(rmC.to_dense()))
