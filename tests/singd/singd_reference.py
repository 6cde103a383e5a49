"""A slow, independent SINGD written from the paper's update rules with dense matrices, for
tests (the algorithm: docs/architecture.md, 'singd: the optimizer').

Everything is a dense tensor; structured factors are kept in their structure by projecting
symmetric terms with ``cls.from_dense`` (Pi) after every operation that needs it and by
checking that products stay inside the pattern. Rows ``a`` and ``g`` are built with explicit
loops over output positions (no ``F.unfold``), from inputs and ``retain_grad`` outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from singd.structures import structure


def conv_patch_rows(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """(B, O1, O2, G, d) patches of a Conv2d input, by explicit slicing."""
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    B, cin, H, W = xp.shape
    G = conv.groups
    cpg = cin // G
    O1 = (H - dh * (kh - 1) - 1) // sh + 1
    O2 = (W - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty(B, O1, O2, G, cpg * kh * kw, dtype=x.dtype)
    for i in range(O1):
        for j in range(O2):
            for gi in range(G):
                patch = xp[
                    :,
                    gi * cpg : (gi + 1) * cpg,
                    i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                    j * sw : j * sw + dw * (kw - 1) + 1 : dw,
                ]
                out[:, i, j, gi] = patch.reshape(B, -1)
    return out


def ref_rows(module: nn.Module, x: Tensor, grad: Tensor, approx: str, loss_average):
    """(a, g) rows, normalised as in SINGD's statistics (docs/architecture.md, 'singd')."""
    if isinstance(module, nn.Conv2d):
        P = conv_patch_rows(module, x)  # B, O1, O2, G, d
        B = P.shape[0]
        gr = grad.permute(0, 2, 3, 1)  # B, O1, O2, Cout
        spatial = P.shape[1] * P.shape[2]
        if approx == "expand":
            a = P.reshape(-1, P.shape[-1])
            g = gr.reshape(-1, gr.shape[-1])
        else:
            a = P.mean(dim=(1, 2)).reshape(-1, P.shape[-1])
            g = gr.sum(dim=(1, 2))
    else:
        B = x.shape[0]
        spatial = x[..., 0].numel() // B
        if approx == "expand" or x.dim() == 2:
            a = x.reshape(-1, x.shape[-1])
            g = grad.reshape(-1, grad.shape[-1])
        else:
            a = x.reshape(B, -1, x.shape[-1]).mean(1)
            g = grad.reshape(B, -1, grad.shape[-1]).sum(1)
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    n = {None: 1, "batch": B, "batch+sequence": B * spatial}[loss_average]
    return a / math.sqrt(a.shape[0]), g * math.sqrt(n)


class ReferenceSINGD:
    """Dense-matrix SINGD on the Linear/Conv2d layers of ``model`` (no fallback params)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr=1e-3,
        momentum=0.9,
        damping=1e-3,
        alpha1=0.5,
        weight_decay=0.0,
        T=10,
        lr_cov=1e-2,
        structures=("dense", "dense"),
        kfac_approx="expand",
        loss_average="batch",
        kfac_like=False,
        normalize_lr_cov=False,
    ):
        self.h = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            alpha1=0.0 if kfac_like else alpha1,
            weight_decay=weight_decay,
            T=T,
            lr_cov=lr_cov,
            kfac_approx=kfac_approx,
            loss_average=loss_average,
            kfac_like=kfac_like,
            normalize_lr_cov=normalize_lr_cov,
        )
        self.clsK, self.clsC = structure(structures[0]), structure(structures[1])
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.state = {}
        self.io = {}
        for m in self.layers:
            dK = m.weight[0].numel() + (m.bias is not None)
            dC = m.weight.shape[0]
            dt = m.weight.dtype
            self.state[m] = {
                "K": torch.eye(dK, dtype=dt),
                "C": torch.eye(dC, dtype=dt),
                "mK": torch.zeros(dK, dK, dtype=dt),
                "mC": torch.zeros(dC, dC, dtype=dt),
                "buf": None,
            }
            m.register_forward_hook(self._hook)
        self.t = 0

    def _hook(self, module, args, out):
        out.retain_grad()
        self.io[module] = (args[0].detach(), out)

    def Pi(self, cls, M: Tensor) -> Tensor:
        """Project a symmetric matrix onto the structure (dense result)."""
        return cls.from_dense(0.5 * (M + M.T)).to_dense()

    def inside(self, cls, M: Tensor) -> Tensor:
        """Assert that M lies in the pattern of cls; return it."""
        mask = cls.from_dense(torch.ones_like(M)).to_dense() != 0
        if (~mask).any():
            outside = M[~mask].abs().max().item()
            assert outside <= 1e-10 * (1 + M.abs().max().item()), "product left the structure"
        return M

    def factor_update(self, m: nn.Module) -> None:
        h, s = self.h, self.state[m]
        x, out = self.io[m]
        a, g = ref_rows(m, x, out.grad, h["kfac_approx"], h["loss_average"])
        K, C = s["K"], s["C"]
        cK, cC = self.clsK, self.clsC
        HK = self.Pi(cK, K.T @ a.T @ a @ K)
        HC = self.Pi(cC, C.T @ g.T @ g @ C)
        KtK, CtC = self.Pi(cK, K.T @ K), self.Pi(cC, C.T @ C)
        avgtr = lambda M: torch.trace(M) / M.shape[0]  # noqa: E731
        lam, a1 = h["damping"], h["alpha1"]
        half = 0.5 * (1 - a1) if h["normalize_lr_cov"] else 0.5
        IK, IC = torch.eye(K.shape[0], dtype=K.dtype), torch.eye(C.shape[0], dtype=C.dtype)
        if h["kfac_like"]:
            mhK = half * (HK + lam * KtK - IK)
            mhC = half * (HC + lam * CtC - IC)
        else:
            mhK = half * (avgtr(HC) * HK + lam * avgtr(C.T @ C) * KtK - IK)
            mhC = half * (avgtr(HK) * HC + lam * avgtr(K.T @ K) * CtC - IC)
        mK = a1 * s["mK"] + mhK
        mC = a1 * s["mC"] + mhC
        beta = h["lr_cov"](self.t) if callable(h["lr_cov"]) else h["lr_cov"]
        bK = bC = beta
        if h["normalize_lr_cov"]:
            bK = beta / max(1.0, mK.abs().max().item())
            bC = beta / max(1.0, mC.abs().max().item())
        s["K"] = self.inside(cK, K - bK * self.inside(cK, K @ mK))
        s["C"] = self.inside(cC, C - bC * self.inside(cC, C @ mC))
        s["mK"], s["mC"] = mK, mC

    @torch.no_grad()
    def step(self) -> None:
        h = self.h
        for m in self.layers:
            if self.t % h["T"] == 0 and m in self.io:
                self.factor_update(m)
            s = self.state[m]
            W = m.weight
            G = W.grad.reshape(W.shape[0], -1)
            P = W.reshape(W.shape[0], -1)
            if m.bias is not None:
                G = torch.cat([G, m.bias.grad[:, None]], 1)
                P = torch.cat([P, m.bias[:, None]], 1)
            K, C = s["K"], s["C"]
            upd = C @ C.T @ G @ K @ K.T + h["weight_decay"] * P
            s["buf"] = upd if s["buf"] is None else h["momentum"] * s["buf"] + upd
            P = P - h["lr"] * s["buf"]
            W.copy_(P[:, : W[0].numel()].reshape(W.shape))
            if m.bias is not None:
                m.bias.copy_(P[:, -1])
        self.io.clear()
        self.t += 1
