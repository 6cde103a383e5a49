"""Every operation of every structure against dense math on ``to_dense()``.

The reference projection ``ref_pi`` is written here from its definition directly (pattern
masks per structure, one-sided entries doubled, ties averaged), independently of the
library's ``from_dense``. Factors are random and non-symmetric (``from_dense`` of a
non-symmetric matrix keeps its pattern entries) as well as symmetric.
"""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch

import singd.structures.toeplitz as toeplitz_module
from singd.structures import FORMS, StructuredMatrix, names, structure

# ---------------------------------------------------------------------------- reference


def params(name: str) -> tuple[int, ...]:
    """The integers of a parametric name (N, or K1 and K2)."""
    return tuple(int(g) for g in re.findall(r"\d+", name))


def pattern(name: str, d: int) -> torch.Tensor:
    """Boolean d x d mask of the free entries, from each structure's definition."""
    i = torch.arange(d).unsqueeze(1)
    j = torch.arange(d).unsqueeze(0)
    if name == "dense":
        return torch.ones(d, d, dtype=torch.bool)
    if name == "diagonal":
        return i == j
    if name.startswith("block"):
        (N,) = params(name)
        return (i // N) == (j // N)
    if name.startswith("hierarchical"):
        K1, K2 = params(name)
        k1 = min(K1, d)
        m = max(d - K1 - K2, 0)
        top = (i < k1).expand(d, d)
        middle = (i >= k1) & (i < k1 + m) & (i == j)
        bottom = (i >= k1 + m) & (j >= k1)
        return top | middle | bottom
    if name in ("tril", "triltoeplitz"):
        return (i >= j).expand(d, d)
    if name in ("triu", "triutoeplitz"):
        return (i <= j).expand(d, d)
    # the reference package's sparse triangles: the diagonal and one row or column
    lines = {
        "triltopleftdiag": i == d - 1,
        "triubottomrightdiag": i == 0,
        "trilbottomrightdiag": j == 0,
        "triutopleftdiag": j == d - 1,
    }
    if name in lines:
        return (i == j) | lines[name]
    raise AssertionError(name)


def ref_pi(name: str, M: torch.Tensor) -> torch.Tensor:
    """Pi as a dense matrix: keep, double one-sided, average ties."""
    d = M.shape[0]
    P = pattern(name, d)
    one_sided = P & ~P.T
    V = torch.where(P, M * (1 + one_sided.to(M.dtype)), torch.zeros_like(M))
    if name.endswith("toeplitz"):
        offset = torch.arange(d).unsqueeze(1) - torch.arange(d).unsqueeze(0)
        for k in range(-d + 1, d):
            tie = (offset == k) & P
            if tie.any():
                V[tie] = V[tie].mean()
    return V


def numel_formula(name: str, d: int) -> int:
    """Stored entries per structure (hierarchical: its block sizes summed exactly)."""
    if name == "dense":
        return d * d
    if name in ("diagonal", "triltoeplitz", "triutoeplitz"):
        return d
    if name in ("tril", "triu"):
        return d * (d + 1) // 2
    if name.endswith("diag"):  # triltopleftdiag etc.: a diagonal and a line sharing a corner
        return 2 * d - 1
    if name.startswith("block"):
        (N,) = params(name)
        return (d // N) * N * N + (d % N) ** 2
    K1, K2 = params(name)
    if d <= K1:
        return d * d
    if d <= K1 + K2:  # A, B and E (no diagonal part)
        return K1 * d + (d - K1) ** 2
    m = d - K1 - K2
    return K1 * K1 + K1 * (d - K1) + m + K2 * m + K2 * K2


# ---------------------------------------------------------------------------- cases

DTYPES = {
    torch.float64: 1e-10,
    torch.float32: 3e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 4e-3,
}
SMALL_STRUCTURES = [
    "dense",
    "diagonal",
    "block1diagonal",
    "block3diagonal",
    "hierarchical3_2",
    "hierarchical1_4",
    "triltoeplitz",
    "triutoeplitz",
    "tril",
    "triu",
    "triltopleftdiag",
    "trilbottomrightdiag",
    "triutopleftdiag",
    "triubottomrightdiag",
]
SMALL_DIMS = [1, 2, 3, 4, 5, 6, 7, 8, 13]
# Dimensions crossing the boundaries of the reference package's default parameters.
LARGE = {
    "block30diagonal": [29, 30, 31, 59, 60, 70],
    "hierarchical15_15": [14, 15, 16, 29, 30, 31, 47, 70],
    "block7diagonal": [6, 7, 8, 63, 70],
    "triltoeplitz": [31, 70],
    "triutoeplitz": [31, 70],
    "tril": [70],
    "dense": [70],
    "diagonal": [70],
    "triltopleftdiag": [70],
    "triubottomrightdiag": [70],
}

CASES = (
    [
        pytest.param(name, d, dtype, id=f"{name}-{d}-{str(dtype)[6:]}")
        for dtype in (torch.float64, torch.float32)
        for name in SMALL_STRUCTURES
        for d in SMALL_DIMS
    ]
    + [
        pytest.param(name, d, dtype, id=f"{name}-{d}-{str(dtype)[6:]}")
        for dtype in (torch.float64, torch.float32)
        for name, dims in LARGE.items()
        for d in dims
    ]
    + [
        pytest.param(name, d, dtype, id=f"{name}-{d}-{str(dtype)[6:]}")
        for dtype in (torch.bfloat16, torch.float16)
        for name in SMALL_STRUCTURES
        for d in (1, 3, 5, 7)
    ]
)


def random_factor(name: str, d: int, dtype: torch.dtype, symmetric: bool, gen) -> StructuredMatrix:
    """A random matrix of the structure: non-symmetric unless ``symmetric``."""
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    if symmetric:
        M = M + M.T
    return structure(name).from_dense(M.to(dtype))


def check(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, dtype) -> None:
    """``|got - want| <= tol(dtype) * max(scale)`` entrywise (scale: an abs-value bound)."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    bound = DTYPES[dtype] * max(scale.abs().max().item() if scale.numel() else 0.0, 1e-30)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("symmetric", [False, True], ids=["nonsym", "sym"])
@pytest.mark.parametrize(("name", "d", "dtype"), CASES)
def test_every_operation_matches_dense_math(name, d, dtype, symmetric):
    gen = torch.Generator().manual_seed(d * 1000 + len(name) + symmetric)
    cls = structure(name)
    P = pattern(name, d)
    S = random_factor(name, d, dtype, symmetric, gen)
    T = random_factor(name, d, dtype, symmetric, gen)
    A, B = S.to_dense().double(), T.to_dense().double()
    Aa, Ba = A.abs(), B.abs()
    assert not A[~P].any(), "to_dense has entries outside the pattern"
    if not symmetric and d > 1 and name != "diagonal" and P.sum() > d:
        assert not torch.equal(A, A.T), "the non-symmetric factor came out symmetric"
    X = torch.randn(d, 4, generator=gen, dtype=torch.float64).to(dtype)
    Xd = X.double()

    # closure: S @ T stays in the class and equals the dense product
    ST = S @ T
    assert type(ST) is cls and ST.dim == d and ST.dtype == dtype
    assert not ST.to_dense()[~P].any()
    check(ST.to_dense(), A @ B, Aa @ Ba, dtype)

    # products with dense tensors
    check(S @ X, A @ Xd, Aa @ Xd.abs(), dtype)
    check(S @ X[:, 0], A @ Xd[:, 0], Aa @ Xd[:, 0].abs(), dtype)
    check(S.rmatmat(X), A.T @ Xd, Aa.T @ Xd.abs(), dtype)
    check(S.rmatmat(X[:, 1]), A.T @ Xd[:, 1], Aa.T @ Xd[:, 1].abs(), dtype)
    check(X.T @ S, Xd.T @ A, Xd.T.abs() @ Aa, dtype)

    # from_inner = Pi(S^T X X^T S), from_inner() = Pi(S^T S)
    H = S.from_inner(X)
    assert type(H) is cls and H.dtype == dtype
    scale = 2 * Aa.T @ Xd.abs() @ Xd.abs().T @ Aa
    check(H.to_dense(), ref_pi(name, A.T @ Xd @ Xd.T @ A), scale, dtype)
    H0 = S.from_inner()
    assert type(H0) is cls
    check(H0.to_dense(), ref_pi(name, A.T @ A), 2 * Aa.T @ Aa, dtype)
    # from_gram(A) = Pi(S^T A S) for a symmetric A = X X^T (the statistic from X^T X)
    HG = S.from_gram(X @ X.T)
    assert type(HG) is cls and HG.dtype == dtype
    check(HG.to_dense(), ref_pi(name, A.T @ Xd @ Xd.T @ A), scale, dtype)

    # traces and norms
    check(S.trace(), A.trace(), d * Aa.max(), dtype)
    check(S.average_trace(), A.trace() / d, Aa.max(), dtype)  # the reference package's name
    assert S.trace().ndim == 0 and S.infinity_vector_norm().ndim == 0
    assert S.infinity_vector_norm().double() == Aa.max()

    # in-place arithmetic returns self and matches dense math
    R = S.clone()
    assert R.add_(T, alpha=-0.5) is R
    check(R.to_dense(), A - 0.5 * B, Aa + Ba, dtype)
    assert R.mul_(3.0) is R
    check(R.to_dense(), 3 * (A - 0.5 * B), 3 * (Aa + Ba), dtype)
    assert R.diag_add_(0.25) is R
    check(
        R.to_dense(), 3 * (A - 0.5 * B) + 0.25 * torch.eye(d, dtype=A.dtype), 3 * (Aa + Ba), dtype
    )
    R.add_(T, alpha=torch.tensor(0.5)).add_(T, alpha=-0.5)  # 0-dim tensor alpha
    R.mul_(torch.tensor(2.0, dtype=dtype))
    check(R.to_dense(), 6 * (A - 0.5 * B) + 0.5 * torch.eye(d, dtype=A.dtype), 6 * (Aa + Ba), dtype)
    assert torch.equal(S.to_dense().double(), A), "clone shares storage with the original"


@pytest.mark.parametrize(("name", "d", "dtype"), CASES)
def test_from_dense_is_the_projection_and_eye_zeros_are_exact(name, d, dtype):
    gen = torch.Generator().manual_seed(d)
    cls = structure(name)
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    M = (M + M.T).to(dtype)
    got = cls.from_dense(M).to_dense().double()
    check(got, ref_pi(name, M.double()), 2 * M.double(), dtype)
    assert torch.equal(cls.eye(d, dtype=dtype).to_dense(), torch.eye(d, dtype=dtype))
    assert torch.equal(cls.zeros(d, dtype=dtype).to_dense(), torch.zeros(d, d, dtype=dtype))
    # Pi is the identity on symmetric members of the class (the pattern's symmetric part)
    if name in ("dense", "diagonal") or name.startswith("block"):
        assert torch.equal(cls.from_dense(got.to(dtype)).to_dense().double(), got)


@pytest.mark.parametrize("name", ["triltoeplitz", "triutoeplitz"])
@pytest.mark.parametrize("d", [1, 2, 3, 17, 64, 70, 150])
def test_toeplitz_fft_path_matches_dense_math(name, d, monkeypatch):
    monkeypatch.setattr(toeplitz_module, "_DENSE_BELOW", 1)
    gen = torch.Generator().manual_seed(d)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        S = random_factor(name, d, dtype, False, gen)
        T = random_factor(name, d, dtype, False, gen)
        A, B = S.to_dense().double(), T.to_dense().double()
        X = torch.randn(d, 3, generator=gen, dtype=torch.float64).to(dtype)
        Xd = X.double()
        check((S @ T).to_dense(), A @ B, A.abs() @ B.abs(), dtype)
        check(S @ X, A @ Xd, A.abs() @ Xd.abs(), dtype)
        check(S.rmatmat(X), A.T @ Xd, A.abs().T @ Xd.abs(), dtype)
        scale = 2 * A.abs().T @ Xd.abs() @ Xd.abs().T @ A.abs()
        check(S.from_inner(X).to_dense(), ref_pi(name, A.T @ Xd @ Xd.T @ A), scale, dtype)
        check(S.from_inner().to_dense(), ref_pi(name, A.T @ A), 2 * A.abs().T @ A.abs(), dtype)


ALL_NAMES = [*names(), "block3diagonal", "block1diagonal", "hierarchical3_2", "hierarchical1_4"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_numel_follows_the_design_table(name):
    cls = structure(name)
    for d in [1, 2, 3, 4, 5, 7, 14, 15, 16, 29, 30, 31, 33, 45, 61, 100, 257]:
        S = cls.zeros(d)
        assert S.numel() == numel_formula(name, d), d
        ties = 1 if name.endswith("toeplitz") else None
        free = d if ties else int(pattern(name, d).sum())
        assert S.numel() == free, d


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_roundtrip_clone_to_and_pickle_preserve_the_matrix(name):
    cls = structure(name)
    d = 11
    S = random_factor(name, d, torch.float32, False, torch.Generator().manual_seed(1))
    state = S.to_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    R = cls.from_dict(d, {k: v.clone() for k, v in state.items()})
    assert type(R) is cls and torch.equal(R.to_dense(), S.to_dense())
    C = S.clone()
    C.mul_(0.0)
    assert S.to_dense().abs().sum() > 0, "clone must not share storage"
    H = S.to(dtype=torch.float64)
    assert H.dtype == torch.float64 and S.dtype == torch.float32
    assert torch.equal(H.to_dense(), S.to_dense().double())
    assert S.device == torch.device("cpu")
    for other in (pickle.loads(pickle.dumps(S)), copy.deepcopy(S)):
        assert type(other) is cls and torch.equal(other.to_dense(), S.to_dense())
    with pytest.raises(ValueError, match="from_dict needs keys"):
        cls.from_dict(d, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shapes"):
        cls.from_dict(d + 1, state)


def test_registry_resolves_names_caches_classes_and_rejects_malformed_names():
    for name in ALL_NAMES:
        cls = structure(name)
        assert cls.name == name and issubclass(cls, StructuredMatrix)
        assert structure(name) is cls and structure(cls) is cls
    assert structure("block30diagonal").N == 30
    assert (structure("hierarchical15_7").K1, structure("hierarchical15_7").K2) == (15, 7)
    assert "block{N}diagonal" in FORMS and "hierarchical{K1}_{K2}" in FORMS
    bad = ["block0diagonal", "hierarchical15", "foo", "", "blockdiagonal", "block030diagonal"]
    bad += ["hierarchical0_3", "hierarchical3_0", "Dense", "block-3diagonal", "dense "]
    for name in bad:
        with pytest.raises(ValueError, match=r"valid forms: .*block\{N\}diagonal"):
            structure(name)
    with pytest.raises(TypeError, match="must be a str"):
        structure(3)


def test_bad_input_raises_errors_that_name_the_shapes():
    D3, B3 = structure("dense"), structure("block3diagonal")
    S = B3.eye(5)
    with pytest.raises(ValueError, match=r"\(5, 5\).*\(4, 2\)"):
        S @ torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        S.rmatmat(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(5, 2, 2\)"):
        S.from_inner(torch.zeros(5, 2, 2))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        torch.zeros(2, 4) @ S
    with pytest.raises(ValueError, match=r"block3diagonal.*dense"):
        S @ D3.eye(5)
    with pytest.raises(ValueError, match=r"\(5, 5\) and \(6, 6\)"):
        S @ B3.eye(6)
    with pytest.raises(ValueError, match="same structure"):
        S.add_(structure("block2diagonal").eye(5))
    with pytest.raises(ValueError, match="dtype"):
        S @ torch.zeros(5, 2, dtype=torch.float64)
    for cls in (D3, B3, structure("triltoeplitz"), structure("hierarchical2_2")):
        with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
            cls.from_dense(torch.zeros(3, 4))
        with pytest.raises(ValueError, match=r"square.*\(3,\)"):
            cls.from_dense(torch.zeros(3))
        with pytest.raises(ValueError, match="dim must be >= 1"):
            cls.eye(0)
        with pytest.raises(TypeError, match="dim must be an int"):
            cls.zeros(2.0)
    with pytest.raises(ValueError, match="mul_: value must be a scalar"):
        S.mul_(torch.ones(2))
    with pytest.raises(ValueError, match=r"blocks=\(1, 2, 2\)"):
        B3(torch.zeros(1, 2, 2), torch.zeros(0, 0))
    with pytest.raises(ValueError, match="outside the triangle"):
        structure("tril")(torch.ones(3, 3))
    with pytest.raises(TypeError, match="family"):
        from singd.structures import BlockDiagonal

        BlockDiagonal(torch.zeros(1, 2, 2), torch.zeros(0, 0))


def test_public_constructors_wrap_stored_tensors():
    t = torch.arange(1.0, 5.0)
    L = structure("triltoeplitz")(t)
    assert torch.equal(L.to_dense()[:, 0], t) and torch.equal(L.to_dense()[0], torch.eye(4)[0])
    U = structure("triutoeplitz")(t)
    assert torch.equal(U.to_dense(), L.to_dense().T)
    H = structure("hierarchical2_1")
    parts = [torch.full(s, float(i + 1)) for i, s in enumerate(H._shapes(5))]
    dense = H(*parts).to_dense()
    assert torch.equal(dense[:2], torch.cat([torch.ones(2, 2), 2 * torch.ones(2, 3)], 1))
    assert dense[2, 2] == 3 and dense[3, 3] == 3 and dense[2, 3] == 0
    assert torch.equal(dense[4], torch.tensor([0.0, 0.0, 4.0, 4.0, 5.0]))
    B = structure("block2diagonal")(torch.ones(2, 2, 2), torch.full((1, 1), 7.0))
    assert B.dim == 5 and B.to_dense()[4, 4] == 7 and B.to_dense()[1, 2] == 0


def test_toeplitz_fft_sizes_are_short_5_smooth_and_never_wrap_around():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for d in range(2, 700):
        n = toeplitz_module._fft_size(d)
        assert n >= 2 * d - 1 and n % 2 == 0 and smooth(n), (d, n)
        assert not any(smooth(m) for m in range(2 * d, n, 2)), (d, n)  # the shortest
    assert toeplitz_module._fft_size(513) == 1080  # not the power of two 2048
