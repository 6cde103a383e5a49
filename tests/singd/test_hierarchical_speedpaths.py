"""The fast paths of ``hierarchical{K1}_{K2}`` against dense math.

The hierarchical products pick their orientation from the operand (row form ``(X^T S)^T``
for transposed or narrow ``X``, column form otherwise), store the matrix as two row bands
with the blocks as views, shortcut the dense (``d <= K1``) and no-diagonal
(``K1 < d <= K1 + K2``) shapes, and compute ``Pi(S^T A S)`` from a Gram matrix by bands
above a size threshold. Each path is checked here against ``to_dense()`` math in float64.
"""

from __future__ import annotations

import pytest
import torch

from singd.structures import structure

# (name, dims): dense (d <= K1), no diagonal part (K1 < d <= K1 + K2), and a diagonal part,
# around the band threshold of from_gram (4 (K1 + K2)).
CASES = [
    ("hierarchical3_2", [1, 3, 4, 5, 6, 19, 20, 31]),
    ("hierarchical15_15", [10, 16, 30, 64, 121, 145]),
]
PARAMS = [(name, d) for name, dims in CASES for d in dims]


def random_factor(name: str, d: int, gen: torch.Generator):
    """A random non-symmetric float64 factor of the structure (identity plus noise)."""
    cls = structure(name)
    S = cls.eye(d, torch.float64)
    for t in S._tensors():
        t.add_(0.3 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
    return S


def operands(d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Right-hand sides of every layout the products distinguish: contiguous and transposed,
    fewer and more than 16 columns, and a single column."""
    out = {}
    for n in (1, 5, 16, 40):
        out[f"C{n}"] = torch.randn(d, n, generator=gen, dtype=torch.float64)
        out[f"T{n}"] = torch.randn(n, d, generator=gen, dtype=torch.float64).T
    return out


@pytest.mark.parametrize(("name", "d"), PARAMS)
def test_products_match_dense_math_in_every_operand_layout(name, d):
    gen = torch.Generator().manual_seed(d)
    S = random_factor(name, d, gen)
    A = S.to_dense()
    for label, X in operands(d, gen).items():
        torch.testing.assert_close(S @ X, A @ X, msg=f"S @ X, {label}")
        torch.testing.assert_close(S.rmatmat(X), A.T @ X, msg=f"S^T X, {label}")
        torch.testing.assert_close(X.T @ S, X.T @ A, msg=f"X^T S, {label}")
        ref = type(S).from_dense(A.T @ X @ X.T @ A)
        torch.testing.assert_close(S.from_inner(X).to_dense(), ref.to_dense(), msg=label)
        # a transposed result feeds the next product correctly (the optimizer chains them)
        Y = S.rmatmat(X)
        torch.testing.assert_close(S @ Y, A @ A.T @ X, msg=f"S S^T X, {label}")


@pytest.mark.parametrize(("name", "d"), PARAMS)
def test_from_gram_is_pi_of_the_sandwich_and_equals_from_inner(name, d):
    gen = torch.Generator().manual_seed(100 + d)
    S = random_factor(name, d, gen)
    A = S.to_dense()
    X = torch.randn(d, 7, generator=gen, dtype=torch.float64)
    G = X @ X.T
    H = S.from_gram(G)
    assert type(H) is type(S) and H.dim == d and H.dtype == S.dtype
    torch.testing.assert_close(H.to_dense(), type(S).from_dense(A.T @ G @ A).to_dense())
    torch.testing.assert_close(H.to_dense(), S.from_inner(X).to_dense())


def test_from_gram_rejects_bad_input_by_name():
    S = structure("hierarchical3_2").eye(8)
    with pytest.raises(ValueError, match=r"from_gram: A must be \(8, 8\)"):
        S.from_gram(torch.zeros(7, 7))
    with pytest.raises(ValueError, match="dtype"):
        S.from_gram(torch.zeros(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        S.from_gram(torch.zeros(8, 3))


@pytest.mark.parametrize(("name", "d"), PARAMS)
def test_results_never_alias_their_operands(name, d):
    """In-place arithmetic on any result leaves the operands unchanged (the dense and
    no-diagonal shortcuts reuse only empty tensors)."""
    gen = torch.Generator().manual_seed(200 + d)
    S = random_factor(name, d, gen)
    T = random_factor(name, d, gen)
    before_S, before_T = S.to_dense().clone(), T.to_dense().clone()
    X = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    results = [S @ T, S.from_inner(X), S.from_inner(), S.from_gram(X @ X.T), S.clone()]
    results.append(type(S).from_dense(before_S))
    for R in results:
        R.mul_(3.0).add_(T, alpha=0.5).diag_add_(1.0)
    assert torch.equal(S.to_dense(), before_S) and torch.equal(T.to_dense(), before_T)


def test_blocks_are_live_views_of_two_row_bands():
    cls = structure("hierarchical3_2")
    d = 9  # k1 = 3, m = 4, k2 = 2
    S = random_factor("hierarchical3_2", d, torch.Generator().manual_seed(0))
    top, c, bot = S._tensors()
    assert top.shape == (3, 9) and c.shape == (4,) and bot.shape == (2, 6)
    assert top.is_contiguous() and bot.is_contiguous()
    assert S.numel() == 3 * 3 + 3 * 6 + 4 + 2 * 4 + 2 * 2
    state = S.to_dict()
    assert [tuple(state[k].shape) for k in cls._fields] == [(3, 3), (3, 6), (4,), (2, 4), (2, 2)]
    state["B"][0, 0] = 42.0  # the to_dict values are the live storage
    state["D"][1, 2] = -7.0
    dense = S.to_dense()
    assert dense[0, 3] == 42.0 and dense[8, 5] == -7.0
    with pytest.raises(AttributeError, match="view of the stored bands"):
        S.A = torch.zeros(3, 3)
    # the constructor copies its blocks into fresh bands
    parts = [state[k].clone() for k in cls._fields]
    R = cls(*parts)
    parts[0].fill_(5.0)
    assert torch.equal(R.to_dense(), S.to_dense())


@pytest.mark.parametrize(("name", "d"), PARAMS)
def test_products_stay_exact_after_in_place_updates(name, d):
    """The block views each matrix makes once follow in-place writes to its bands (the
    optimizer updates K in place between products)."""
    gen = torch.Generator().manual_seed(300 + d)
    S = random_factor(name, d, gen)
    T = random_factor(name, d, gen)
    X = torch.randn(d, 6, generator=gen, dtype=torch.float64)
    for step in range(3):
        A, B = S.to_dense(), T.to_dense()
        torch.testing.assert_close((S @ T).to_dense(), A @ B, msg=f"step {step}")
        pi = type(S).from_dense
        torch.testing.assert_close(S.from_inner().to_dense(), pi(A.T @ A).to_dense())
        torch.testing.assert_close(
            S.from_gram(X @ X.T).to_dense(), pi(A.T @ X @ X.T @ A).to_dense()
        )
        torch.testing.assert_close(S.trace(), A.trace())
        S.add_(T, alpha=0.25).mul_(0.9).diag_add_(0.1)
        torch.testing.assert_close(
            S.to_dense(), 0.9 * (A + 0.25 * B) + 0.1 * torch.eye(d, dtype=A.dtype)
        )
