"""Models, data and a training loop shared by the SINGD optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(dtype=torch.float32, inplace=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(dtype)


def batch(seed=0, n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def train(model, opt, steps, data=batch, autocast=None, scaler=None, forward=None):
    losses = []
    forward = forward or model
    for t in range(steps):
        X, y = data(t)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(forward(X), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
    return losses


FAST = dict(lr=0.05, lr_cov=0.05, damping=0.1, T=1)


def no_hooks(model):
    return all(len(m._forward_hooks) == 0 for m in model.modules())


class Zoo(nn.Module):
    """Every kind of parameter SINGD leaves to the first-order fallback, plus two Linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.gain = nn.Parameter(torch.ones(8))  # free parameter on a non-leaf module

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(h).mean(1)
        h = torch.relu(self.lin(self.bn(h))) * self.gain
        return self.head(h)
