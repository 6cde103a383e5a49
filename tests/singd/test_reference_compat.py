"""Code written for the reference ``singd`` 0.0.5 package (github f-dangel/singd) runs
unchanged: its import paths, class names, template subclasses, constructors, the interface
methods its users call, and the training loop of its basic example."""

from __future__ import annotations

import importlib

import pytest
import torch

import singd
from singd.structures import names, structure

#: (module, class name, registry name) of every structure class the reference ships.
REFERENCE_CLASSES = [
    ("singd.structures.dense", "DenseMatrix", "dense"),
    ("singd.structures.diagonal", "DiagonalMatrix", "diagonal"),
    ("singd.structures.blockdiagonal", "Block30DiagonalMatrix", "block30diagonal"),
    ("singd.structures.hierarchical", "Hierarchical15_15Matrix", "hierarchical15_15"),
    ("singd.structures.triltoeplitz", "TrilToeplitzMatrix", "triltoeplitz"),
    ("singd.structures.triutoeplitz", "TriuToeplitzMatrix", "triutoeplitz"),
    ("singd.structures.triltopleftdiag", "TrilTopLeftDiagonalMatrix", "triltopleftdiag"),
    (
        "singd.structures.trilbottomrightdiag",
        "TrilBottomRightDiagonalMatrix",
        "trilbottomrightdiag",
    ),
    ("singd.structures.triutopleftdiag", "TriuTopLeftDiagonalMatrix", "triutopleftdiag"),
    (
        "singd.structures.triubottomrightdiag",
        "TriuBottomRightDiagonalMatrix",
        "triubottomrightdiag",
    ),
]


# ---------------------------------------------------------------------------- import paths


def test_reference_optimizer_import_path_gives_our_singd():
    from singd.optim.optimizer import SINGD

    assert SINGD is singd.SINGD


@pytest.mark.parametrize(("module", "cls", "name"), REFERENCE_CLASSES)
def test_reference_structure_import_paths_give_the_registry_classes(module, cls, name):
    # the same class object, so isinstance checks on the optimizer's factors agree
    assert getattr(importlib.import_module(module), cls) is structure(name)


def test_reference_templates_are_importable_from_their_modules():
    from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
    from singd.structures.hierarchical import HierarchicalMatrixTemplate

    assert issubclass(structure("block30diagonal"), BlockDiagonalMatrixTemplate)
    assert issubclass(structure("hierarchical15_15"), HierarchicalMatrixTemplate)


# ---------------------------------------------------------------------------- templates


def test_block_template_subclass_with_block_dim_is_a_block3diagonal_structure():
    from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate

    class Block3DiagonalMatrix(BlockDiagonalMatrixTemplate):
        BLOCK_DIM = 3

    assert Block3DiagonalMatrix.name == "block3diagonal" and Block3DiagonalMatrix.N == 3
    gen = torch.Generator().manual_seed(0)
    blocks, last = torch.randn(2, 3, 3, generator=gen), torch.randn(1, 1, generator=gen)
    S = Block3DiagonalMatrix(blocks, last)
    want = structure("block3diagonal")(blocks, last).to_dense()
    assert S.dim == 7 and torch.equal(S.to_dense(), want)
    M = torch.randn(7, 7, generator=gen)
    M = M + M.T
    P = Block3DiagonalMatrix.from_dense(M)
    assert type(P) is Block3DiagonalMatrix
    assert torch.equal(P.to_dense(), structure("block3diagonal").from_dense(M).to_dense())
    torch.testing.assert_close((S @ P).to_dense(), want @ P.to_dense())
    assert torch.equal(Block3DiagonalMatrix.eye(7).to_dense(), torch.eye(7))
    assert torch.equal(Block3DiagonalMatrix.zeros(5).to_dense(), torch.zeros(5, 5))


@pytest.mark.parametrize("attrs", [{"MAX_K1": 3, "MAX_K2": 2}, {"K1": 3, "K2": 2}])
def test_hierarchical_template_subclass_with_k1_k2_is_a_hierarchical3_2_structure(attrs):
    from singd.structures.hierarchical import HierarchicalMatrixTemplate

    H3_2 = type("Hierarchical3_2Matrix", (HierarchicalMatrixTemplate,), dict(attrs))
    assert H3_2.name == "hierarchical3_2" and (H3_2.K1, H3_2.K2) == (3, 2)
    assert (H3_2.MAX_K1, H3_2.MAX_K2) == (3, 2)
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(8, 8, generator=gen)
    M = M + M.T
    S = H3_2.from_dense(M)
    assert type(S) is H3_2
    assert torch.equal(S.to_dense(), structure("hierarchical3_2").from_dense(M).to_dense())
    # the reference's constructor order (A, B, C, D, E), C the diagonal part
    R = H3_2(S.A, S.B, S.C, S.D, S.E)
    assert torch.equal(R.to_dense(), S.to_dense()) and torch.equal(R.C, S.c)
    assert torch.equal(H3_2.eye(8).to_dense(), torch.eye(8))


def test_template_subclass_with_a_bad_block_size_is_rejected():
    from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate

    with pytest.raises(ValueError, match="block size"):
        type("Bad", (BlockDiagonalMatrixTemplate,), {"BLOCK_DIM": 2.5})


# ---------------------------------------------------------------------------- constructors


def test_reference_constructors_take_the_reference_stored_tensors():
    from singd.structures.dense import DenseMatrix
    from singd.structures.diagonal import DiagonalMatrix
    from singd.structures.triltoeplitz import TrilToeplitzMatrix
    from singd.structures.triutoeplitz import TriuToeplitzMatrix

    mat = torch.arange(9.0).reshape(3, 3)
    assert torch.equal(DenseMatrix(mat).to_dense(), mat)
    assert torch.equal(
        DiagonalMatrix(torch.tensor([1.0, 2.0])).to_dense(), torch.diag(torch.tensor([1.0, 2.0]))
    )
    t = torch.tensor([1.0, 2.0, 3.0])
    want = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [3.0, 2.0, 1.0]])
    assert torch.equal(TrilToeplitzMatrix(t).to_dense(), want)
    assert torch.equal(TriuToeplitzMatrix(t).to_dense(), want.T)


def test_sparse_triangles_follow_the_reference_layouts():
    from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix
    from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix
    from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix
    from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix

    diag, line = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    # [[D, 0], [row]]: the last row, its last entry on the diagonal
    want = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    assert torch.equal(TrilTopLeftDiagonalMatrix(diag, line).to_dense(), want)
    # [[D, col]]: the last column
    assert torch.equal(TriuTopLeftDiagonalMatrix(diag, line).to_dense(), want.T)
    # [[c1, 0], [c2, D]]: the first column, its first entry on the diagonal
    want = torch.tensor([[3.0, 0.0, 0.0], [4.0, 1.0, 0.0], [5.0, 0.0, 2.0]])
    assert torch.equal(TrilBottomRightDiagonalMatrix(diag, line).to_dense(), want)
    # [[row], [0, D]]: the first row
    assert torch.equal(TriuBottomRightDiagonalMatrix(diag, line).to_dense(), want.T)
    S = TrilTopLeftDiagonalMatrix(diag, line)
    assert torch.equal(S.diag, diag) and torch.equal(S.line, line) and S.numel() == 5
    assert TrilTopLeftDiagonalMatrix(torch.zeros(0), torch.tensor([7.0])).to_dense() == 7
    with pytest.raises(ValueError, match=r"diag \(d - 1,\) and line \(d,\)"):
        TrilTopLeftDiagonalMatrix(line, line)
    with pytest.raises(ValueError, match="pad"):
        TrilTopLeftDiagonalMatrix.from_dict(2, {"data": torch.ones(2, 2)})


# ---------------------------------------------------------------------------- interface

ALL = [*names(), "block3diagonal", "hierarchical3_2"]


@pytest.mark.parametrize("name", ALL)
def test_reference_interface_methods_match_dense_math(name):
    gen = torch.Generator().manual_seed(len(name))
    cls, d = structure(name), 7
    S = cls.from_dense(torch.randn(d, d, generator=gen, dtype=torch.float64))
    T = cls.from_dense(torch.randn(d, d, generator=gen, dtype=torch.float64))
    A, B = S.to_dense(), T.to_dense()
    X = torch.randn(d, 4, generator=gen, dtype=torch.float64)
    close = torch.testing.assert_close

    # average_trace (the reference's name) next to trace
    close(S.average_trace(), A.diagonal().mean())
    close(S.average_trace(), S.trace() / d)
    close(S.frobenius_norm(), torch.linalg.matrix_norm(A))
    # from_inner2(XXT) = Pi(S^T XXT S); from_mat_inner(X) = Pi(X X^T)
    XXT = X @ X.T
    close(S.from_inner2(XXT).to_dense(), cls.from_dense(A.T @ XXT @ A).to_dense())
    close(cls.from_mat_inner(X).to_dense(), cls.from_dense(XXT).to_dense())
    # out-of-place + and scalar * leave the operands unchanged
    close((S + T).to_dense(), A + B)
    close((S * 2.5).to_dense(), 2.5 * A)
    close((0.5 * S).to_dense(), 0.5 * A)
    close((S * torch.tensor(3.0, dtype=torch.float64)).to_dense(), 3 * A)
    assert torch.equal(S.to_dense(), A) and torch.equal(T.to_dense(), B)
    with pytest.raises(TypeError, match="scalar"):
        S * T
    assert dict(S.named_tensors()).keys() == S.to_dict().keys()
    # the rest of the reference interface users call: @, rmatmat, from_inner, diag_add_, ...
    close((S @ T).to_dense(), A @ B)
    close(S @ X, A @ X)
    close(S.rmatmat(X), A.T @ X)
    close(S.from_inner(X).to_dense(), cls.from_dense(A.T @ XXT @ A).to_dense())
    close(S.from_inner().to_dense(), cls.from_dense(A.T @ A).to_dense())
    close(S.clone().diag_add_(2.0).to_dense(), A + 2 * torch.eye(d, dtype=A.dtype))
    assert S.infinity_vector_norm() == A.abs().max()


# ---------------------------------------------------------------------------- training


def reference_basic_example(structures: tuple[str, str]) -> tuple[float, float]:
    """The training loop of the reference's basic example (docs/examples/example_01_basic.py,
    the README's usage link) verbatim, with tiny synthetic data in place of MNIST; returns the
    loss over the data set before and after training."""
    from torch import cuda, device, manual_seed
    from torch.nn import Conv2d, CrossEntropyLoss, Flatten, Linear, ReLU, Sequential
    from torch.utils.data import DataLoader, TensorDataset

    from singd.optim.optimizer import SINGD

    manual_seed(0)  # make deterministic
    MAX_STEPS = 200  # quit training after this many steps (or one epoch)
    DEV = device("cuda" if cuda.is_available() else "cpu")

    # tiny 1 x 9 x 9 images with 4 classes: which quadrant is brightest (MNIST in the reference)
    images = torch.randn(8192, 1, 9, 9)
    quadrants = images[:, 0, :8, :8].unflatten(1, (2, 4)).unflatten(3, (2, 4)).sum((2, 4))
    labels = quadrants.flatten(1).argmax(1)
    BATCH_SIZE = 32
    train_dataset = TensorDataset(images, labels)
    train_loader = DataLoader(dataset=train_dataset, batch_size=BATCH_SIZE, shuffle=True)

    model = Sequential(
        Conv2d(1, 3, kernel_size=5, stride=2),
        ReLU(),
        Flatten(),
        Linear(27, 20),
        ReLU(),
        Linear(20, 4),
    ).to(DEV)
    loss_func = CrossEntropyLoss().to(DEV)

    singd = SINGD(model, structures=structures, lr=5e-2, damping=1e-3, weight_decay=1e-4, T=1)

    def full_loss() -> float:
        with torch.no_grad():
            return loss_func(model(images.to(DEV)), labels.to(DEV)).item()

    before = full_loss()
    PRINT_LOSS_EVERY = 25  # logging interval

    for step, (inputs, target) in enumerate(train_loader):
        singd.zero_grad()  # clear gradients from previous iterations

        # regular forward-backward pass
        loss = loss_func(model(inputs.to(DEV)), target.to(DEV))
        loss.backward()
        if step % PRINT_LOSS_EVERY == 0:
            print(f"Step {step}, Loss {loss.item():.3f}")

        singd.step()  # update neural network parameters

        if step >= MAX_STEPS:  # don't train a full epoch to keep the example light-weight
            break
    return before, full_loss()


@pytest.mark.parametrize(
    "structures",
    [
        ("dense", "dense"),
        ("diagonal", "block30diagonal"),
        ("hierarchical15_15", "triltoeplitz"),
        ("triltopleftdiag", "triltopleftdiag"),
        ("trilbottomrightdiag", "trilbottomrightdiag"),
        ("triutopleftdiag", "triutopleftdiag"),
        ("triubottomrightdiag", "triubottomrightdiag"),
        ("triltopleftdiag", "triubottomrightdiag"),
    ],
    ids="-".join,
)
def test_reference_basic_example_trains_unchanged_and_reduces_the_loss(structures):
    before, after = reference_basic_example(structures)
    assert after < 0.75 * before, (before, after)
