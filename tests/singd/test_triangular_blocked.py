"""The blocked products of ``tril``/``triu`` (``singd.structures.triangular``) against dense
products of the same matrices: every product, sizes around the block threshold (and with
tiny blocks, so that many-block layouts are cheap to test), both triangles, fp32 and fp64;
and whole optimizer runs with blocking forced on against the dense reference optimizer."""

from __future__ import annotations

import pytest
import torch
from singd_reference import ReferenceSINGD
from torch import nn

import singd.structures.triangular as tri
from singd import SINGD
from singd.structures import structure


def small_blocks(monkeypatch, width: int) -> None:
    """Force the blocked code paths for every size, with blocks of ``width``."""
    monkeypatch.setattr(tri, "BLOCKED_FROM", 1)
    monkeypatch.setattr(tri, "BLOCKED_DENSE_FROM", 1)
    monkeypatch.setattr(tri, "BLOCK", width)


def triangle(name: str, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random lower (tril) or upper (triu) triangular tensor."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (M.tril() if name == "tril" else M.triu()).to(dtype)


def ref_pi(name: str, S: torch.Tensor) -> torch.Tensor:
    """Pi onto a triangle written from its definition: keep the triangle, double the
    one-sided off-diagonal entries."""
    off = S.tril(-1) if name == "tril" else S.triu(1)
    return off * 2 + torch.diag(S.diagonal())


def outside(name: str, M: torch.Tensor) -> torch.Tensor:
    """The entries of ``M`` outside the triangle of ``name``."""
    return M.triu(1) if name == "tril" else M.tril(-1)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def check_all_products(name: str, d: int, dtype: torch.dtype, n: int = 7) -> None:
    """Every Triangular product equals the dense product (in float64) to tolerance; the
    structured results are exactly triangular."""
    cls = structure(name)
    M, N = triangle(name, d, dtype, 1), triangle(name, d, dtype, 2)
    A, B = cls(M), cls(N)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(d, n, generator=g, dtype=torch.float64).to(dtype)
    R = torch.randn(d, d, generator=g, dtype=torch.float64)
    Sym = (R @ R.T).to(dtype)
    m, nn_, x, sym = M.double(), N.double(), X.double(), Sym.double()
    scale = max(1.0, float(m.abs().max()) ** 2 * d)  # products grow with d: relative check
    cases = {
        "matmul": ((A @ B).mat, m @ nn_),
        "matmat": (A @ X, m @ x),
        "rmatmat": (A.rmatmat(X), m.T @ x),
        "from_inner": (A.from_inner(X).mat, ref_pi(name, m.T @ x @ x.T @ m)),
        "from_inner_eye": (A.from_inner().mat, ref_pi(name, m.T @ m)),
        "from_gram": (A.from_gram(Sym).mat, ref_pi(name, m.T @ sym @ m)),
        "gram_left": (A.gram_left(X), m @ m.T @ x),
        "gram_right": (A.gram_right(X.T), x.T @ m @ m.T),
        "gram_matrix": (A.gram_matrix(), m @ m.T),
    }
    for what, (got, want) in cases.items():
        assert got.dtype == dtype, what
        torch.testing.assert_close(
            got.double() / scale, want / scale, **TOL[dtype], msg=f"{name} d={d} {what}"
        )
    for what in ("matmul", "from_inner", "from_inner_eye", "from_gram"):
        assert not outside(name, cases[what][0]).any(), f"{name} d={d} {what} left the triangle"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["tril", "triu"])
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_blocked_products_equal_dense_products_with_tiny_blocks(monkeypatch, width, d, name, dtype):
    small_blocks(monkeypatch, width)
    assert len(tri._blocks(d)) == max(1, round(d / width))
    check_all_products(name, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["tril", "triu"])
def test_products_equal_dense_products_around_the_threshold(name, dtype):
    cut = tri.BLOCKED_FROM
    for d in (cut - 1, cut, cut + 1, 2 * tri.BLOCK + 1):
        assert tri.blocked(d) == (d >= cut)
        check_all_products(name, d, dtype, n=tri.BLOCKED_DENSE_FROM // cut + 3)


@pytest.mark.parametrize("name", ["tril", "triu"])
def test_thin_dense_operands_take_the_plain_product_and_agree(name):
    d = tri.BLOCKED_FROM + 9
    assert tri.blocked(d) and not tri.blocked(d, 2)
    check_all_products(name, d, torch.float64, n=2)


@pytest.mark.parametrize("name", ["tril", "triu"])
@pytest.mark.parametrize("d", [2 * tri.THIN, tri.BLOCKED_FROM + 9])
def test_thin_gram_left_takes_the_transposed_form_and_agrees(name, d):
    n = tri.THIN
    A = structure(name)(triangle(name, d, torch.float64, 4))
    X = torch.randn(d, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = A.gram_left(X)
    assert got.is_contiguous()
    torch.testing.assert_close(got, A.mat @ A.mat.T @ X, rtol=1e-10, atol=1e-10)


def test_blocked_gram_matrix_mirrors_its_off_diagonal_blocks_exactly(monkeypatch):
    small_blocks(monkeypatch, 3)
    for name in ("tril", "triu"):
        A = structure(name)(triangle(name, 11, torch.float32, 6))
        P = A.gram_matrix()
        for s, e in tri._blocks(11):  # outside the diagonal blocks: exact mirror images
            assert torch.equal(P[s:e, :s], P[:s, s:e].T)
        torch.testing.assert_close(P, P.T, rtol=1e-6, atol=1e-6)


def test_block_edges_cover_the_matrix_with_the_remainder_in_the_last_block(monkeypatch):
    monkeypatch.setattr(tri, "BLOCK", 128)
    assert tri._blocks(513) == ((0, 128), (128, 256), (256, 384), (384, 513))
    assert tri._blocks(100) == ((0, 100),)
    for d in (1, 127, 192, 200, 383, 1000):
        edges = tri._blocks(d)
        assert edges[0][0] == 0 and edges[-1][1] == d
        assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))


# ---------------------------------------------------------------------- optimizer runs
def cnn() -> nn.Module:
    """Conv (gram-route statistic: more rows than columns) + Linear, float64."""
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
        nn.Tanh(),
        nn.Linear(6, 3, bias=False),
    ).double()


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("name", ["tril", "triu"])
def test_optimizer_with_forced_blocking_equals_dense_reference(monkeypatch, name, T):
    small_blocks(monkeypatch, 4)
    hyper = dict(
        lr=0.05, lr_cov=0.1, damping=0.1, momentum=0.9, weight_decay=0.01, alpha1=0.5, T=T,
        structures=(name, name),
    )  # fmt: skip
    torch.manual_seed(0)
    model, ref_model = cnn(), cnn()
    ref_model.load_state_dict(model.state_dict())
    opt, ref = SINGD(model, **hyper), ReferenceSINGD(ref_model, **hyper)
    for t in range(8):
        g = torch.Generator().manual_seed(t)
        X = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (6,), generator=g)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad() if o is opt else m.zero_grad()
            nn.functional.cross_entropy(m(X), y).backward()
            o.step()
    K = opt.preconditioner_factors()["3"].factors["K"].dense()
    assert (K - torch.eye(K.shape[0], dtype=K.dtype)).abs().max() > 1e-3  # not vacuous
    assert not outside(name, K).any()
    for (pname, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9, msg=f"parameter {pname} differs")


@pytest.mark.parametrize("name", ["tril", "triu"])
def test_blocked_sizes_keep_autograd_working(monkeypatch, name):
    small_blocks(monkeypatch, 2)
    M = triangle(name, 6, torch.float64, 7).requires_grad_()
    X = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    A, B = structure(name)(M), structure(name)(M.detach())
    loss = (A @ X).square().sum() + (B @ A).mat.sum() + A.from_inner(X).mat.sum()
    loss.backward()
    m, x = M.detach().clone().requires_grad_(), X.detach().clone().requires_grad_()
    P = m.detach() @ m
    P = P - outside(name, P)  # the triangle of the product, as the structure keeps it
    ref = (m @ x).square().sum() + P.sum() + ref_pi(name, m.T @ x @ x.T @ m).sum()
    ref.backward()
    torch.testing.assert_close(M.grad, m.grad)
    torch.testing.assert_close(X.grad, x.grad)
