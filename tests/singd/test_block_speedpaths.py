"""The speed paths of ``block{N}diagonal`` (``singd.structures.blockdiagonal``): the
zero-padded storage, the row and column forms of dense products, and instances wrapped from separate
parts (how ``update.gram`` builds block Grams) agree with dense algebra."""

from __future__ import annotations

import pytest
import torch

from singd.structures import structure

N = 4
# (dim): last block only, full blocks only, both (a one-element and a wider last block)
DIMS = [3, 8, 9, 11]


def pad_of(S) -> torch.Tensor:
    """The entries of the padded storage outside the blocks (empty when there is no pad)."""
    data = S.data
    nb, r = divmod(S.dim, S.N)
    if nb == 0 or r == 0:
        return data.new_zeros(0)
    mask = torch.ones_like(data, dtype=torch.bool)
    mask[:nb] = False
    mask[nb, :r, :r] = False
    return data[mask]


def random_block(d: int, seed: int):
    """A random non-symmetric block-diagonal matrix of size d (float64)."""
    gen = torch.Generator().manual_seed(seed)
    cls = structure(f"block{N}diagonal")
    nb, r = divmod(d, N)
    return cls(
        torch.randn(nb, N, N, generator=gen, dtype=torch.float64),
        torch.randn(r, r, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("d", DIMS)
def test_pad_stays_zero_through_a_singd_update(d):
    S, T = random_block(d, 0), random_block(d, 1)
    X = torch.randn(d, 7, dtype=torch.float64)
    H = S.from_inner(X).mul_(torch.tensor(0.3, dtype=torch.float64))
    H.add_(S.from_inner(), alpha=0.1).diag_add_(-0.5).diag_add_(torch.tensor(0.2).double())
    H.add_(T, alpha=torch.tensor(0.5, dtype=torch.float64))
    for M in (H, S @ H, S.from_inner(torch.randn(d, 2, dtype=torch.float64)), S.gram_blocks()):
        assert torch.equal(pad_of(M), torch.zeros_like(pad_of(M)))
    ref = S.to_dense().T @ X @ X.T @ S.to_dense()
    expected = structure(S.name).from_dense(ref).to_dense() * 0.3
    expected += 0.1 * structure(S.name).from_dense(S.to_dense().T @ S.to_dense()).to_dense()
    expected += (-0.3) * torch.eye(d, dtype=torch.float64) + 0.5 * T.to_dense()
    torch.testing.assert_close(H.to_dense(), expected)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", [1, 3, 15, 16, 40])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_dense_products_match_dense_in_every_layout(d, n, layout):
    S = random_block(d, d + n)
    A = S.to_dense()
    base = torch.randn(d, n, dtype=torch.float64)
    if layout == "transposed":
        X = base.T.contiguous().T  # unit row stride: the row-form path
    elif layout == "sliced":
        X = torch.randn(d, 2 * n + 1, dtype=torch.float64)[:, 1::2]
    else:
        X = base
    torch.testing.assert_close(S @ X, A @ X)
    torch.testing.assert_close(S.rmatmat(X), A.T @ X)
    torch.testing.assert_close(X.T @ S, X.T @ A)
    torch.testing.assert_close(S.rmatmat(S.rmatmat(X)), A.T @ A.T @ X)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", [2, N, 13])
def test_statistic_matches_dense_for_transposed_and_contiguous_rows(d, n):
    S = random_block(d, 3)
    rows = torch.randn(n, d, dtype=torch.float64)
    A = S.to_dense()
    expected = structure(S.name).from_dense(A.T @ rows.T @ rows @ A).to_dense()
    torch.testing.assert_close(S.from_inner(rows.T).to_dense(), expected)
    torch.testing.assert_close(S.from_inner(rows.T.contiguous()).to_dense(), expected)


@pytest.mark.parametrize("d", DIMS)
def test_instance_from_separate_parts_packs_only_when_modified(d):
    """``_wrap(dim, blocks, last)`` (as ``update.gram`` builds Grams) keeps the parts for
    products; an in-place operation packs them into the padded storage first."""
    S = random_block(d, 4)
    cls = type(S)
    P = cls._wrap(d, S.blocks.clone(), S.last.clone())
    X = torch.randn(d, 5, dtype=torch.float64)
    torch.testing.assert_close(P @ X, S.to_dense() @ X)
    assert P._data is None  # products did not pack
    P.diag_add_(1.0)
    assert P._data is not None
    expected = S.to_dense() + torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(P.to_dense(), expected)
    torch.testing.assert_close(P @ X, expected @ X)
    state = P.to_dict()
    P.mul_(2.0)  # to_dict values are live views of the storage
    torch.testing.assert_close(structure(S.name).from_dict(d, state).to_dense(), 2 * expected)


def test_gram_blocks_is_the_product_with_the_transpose():
    S = random_block(11, 5)
    torch.testing.assert_close(S.gram_blocks().to_dense(), S.to_dense() @ S.to_dense().T)


def test_numel_counts_stored_entries_not_the_pad():
    S = random_block(11, 6)
    assert S.numel() == 2 * N * N + 9
    assert S.data.numel() == 3 * N * N


def test_non_finite_entry_stays_in_its_block():
    S = random_block(11, 7)
    S.blocks[0, 1, 2] = float("inf")
    P = S @ S @ S
    assert not torch.isfinite(P.blocks[0]).all()
    assert torch.isfinite(P.blocks[1]).all() and torch.isfinite(P.last).all()


@pytest.mark.parametrize("d", DIMS)
def test_from_gram_equals_the_statistic_of_the_rows(d):
    S = random_block(d, 8)
    rows = torch.randn(20, d, dtype=torch.float64)
    expected = S.from_inner(rows.T)
    got = S.from_gram(rows.T @ rows)
    torch.testing.assert_close(got.to_dense(), expected.to_dense())
    assert torch.equal(pad_of(got), torch.zeros_like(pad_of(got)))
    with pytest.raises(ValueError, match="from_gram"):
        S.from_gram(torch.zeros(d + 1, d + 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cached_scalars_give_bitwise_the_python_number_results(dtype):
    """``mul_`` uses cached 0-dim tensors instead of Python numbers; the stored values must
    not change by a single bit."""
    S = random_block(11, 9).to(dtype=dtype)
    ref = S.data.clone()
    for value in (0.5, 0.9, 3, -1e-3):
        S.mul_(value)
        ref.mul_(value)
        assert torch.equal(S.data, ref)
    assert torch.equal(S.trace(), ref.diagonal(dim1=1, dim2=2).sum())
    with pytest.raises(ValueError, match="scalar"):
        S.mul_(torch.ones(2, dtype=dtype))


@pytest.mark.parametrize("d", DIMS)
def test_to_dense_places_every_block(d):
    S = random_block(d, 10)
    expected = torch.block_diag(*S.blocks.unbind(0), S.last)
    assert torch.equal(S.to_dense(), expected)
    torch.testing.assert_close(S.gram_blocks().to_dense(), expected @ expected.T)


def test_assigning_a_block_view_raises_and_names_the_storage():
    """``blocks``/``last`` are views of the padded storage: rebinding them would detach
    them from it silently, so assignment is refused (in-place writes are the way)."""
    S = random_block(65, 0)
    for field in ("blocks", "last"):
        with pytest.raises(AttributeError, match=f"{field} is a view of the stored data"):
            setattr(S, field, torch.zeros_like(getattr(S, field)))
    before = S.blocks[0].clone()
    S.blocks.mul_(2.0)  # in place: seen by the storage
    assert torch.equal(S.blocks[0], 2 * before)
    assert torch.equal(S.to_dense()[:N, :N], S.blocks[0])
