"""An explicit ``nn.MultiheadAttention`` forward (projections as separate products whose
outputs keep their gradients), for checking the rows SINGD captures from the real module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def projection_weights(m: nn.MultiheadAttention) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Role -> (weight, bias) of each projection, as views of the module's parameters."""
    E = m.embed_dim
    out = {}
    for i, r in enumerate("qkv"):
        w = m.in_proj_weight[i * E : (i + 1) * E] if m.in_proj_weight is not None else None
        w = getattr(m, f"{r}_proj_weight") if w is None else w
        b = None if m.in_proj_bias is None else m.in_proj_bias[i * E : (i + 1) * E]
        out[r] = (w, b)
    out["out"] = (m.out_proj.weight, m.out_proj.bias)
    return out


def explicit_attention(
    m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """The module's output (no masks, no dropout) and, per role, (projection input,
    projection output) batch first ``(B, L, d)``; the outputs retain their gradients."""
    if not m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    B, L, E = query.shape
    H, hd = m.num_heads, E // m.num_heads
    W = projection_weights(m)
    io = {}
    proj = {}
    for r, x in zip("qkv", (query, key, value)):
        y = F.linear(x, *W[r])
        y.retain_grad()
        io[r] = (x, y)
        proj[r] = y.reshape(B, -1, H, hd).transpose(1, 2)  # B, H, S, hd
    att = torch.softmax(proj["q"] @ proj["k"].transpose(-2, -1) / math.sqrt(hd), dim=-1)
    o = (att @ proj["v"]).transpose(1, 2).reshape(B, L, E)
    y = F.linear(o, *W["out"])
    y.retain_grad()
    io["out"] = (o, y)
    return (y if m.batch_first else y.transpose(0, 1)), io
