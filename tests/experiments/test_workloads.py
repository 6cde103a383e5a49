"""Tests for the embedded digits workloads: splits, loaders and models."""

import pytest
import torch
from torch import nn

from experiments.workloads import (
    WORKLOADS,
    BatchLoader,
    TinyViT,
    build_model,
    load_digits_data,
)


@pytest.fixture(scope="module")
def data():
    return load_digits_data()


def test_splits_partition_all_1797_images_without_overlap(data):
    sizes = [len(data.split(s)[0]) for s in ("train", "val", "test")]
    assert sum(sizes) == 1797
    train_rows = {tuple(r.tolist()) for r in data.x_train.flatten(1)}
    test_rows = {tuple(r.tolist()) for r in data.x_test.flatten(1)}
    # digits contains a few exact duplicate images; overlap can only come from those.
    assert len(train_rows & test_rows) <= 5
    assert data.x_train.shape[1:] == (1, 8, 8)


def test_splits_are_stratified_so_class_fractions_match(data):
    fractions = []
    for s in ("train", "val", "test"):
        y = data.split(s)[1]
        fractions.append(torch.bincount(y, minlength=10).float() / len(y))
    assert (fractions[0] - fractions[2]).abs().max() < 0.01
    assert (fractions[0] - fractions[1]).abs().max() < 0.01


def test_train_split_is_normalised_to_zero_mean_unit_std(data):
    assert abs(float(data.x_train.mean())) < 1e-4
    assert abs(float(data.x_train.std()) - 1.0) < 1e-3


def test_split_is_fixed_across_loads():
    a = load_digits_data(split_seed=0)
    b = load_digits_data(test_fraction=0.2, val_fraction=0.2, split_seed=0)
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_val, b.x_val)


def test_bad_split_arguments_raise_naming_the_argument(data):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_data(test_fraction=1.5)
    with pytest.raises(ValueError, match="split must be one of"):
        data.split("validation")


def test_loader_order_is_deterministic_per_seed_and_differs_across_epochs(data):
    def first_labels(seed, epochs=2):
        loader = BatchLoader(data.x_train, data.y_train, 32, seed=seed)
        return [next(iter(loader))[1] for _ in range(epochs)]

    a, b = first_labels(3), first_labels(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(first_labels(4)[0], a[0])


def test_loader_covers_every_sample_once_per_epoch(data):
    loader = BatchLoader(data.x_train, data.y_train, 100, seed=0)
    ys = torch.cat([y for _, y in loader])
    assert len(loader) == -(-len(data.y_train) // 100)
    assert torch.equal(torch.sort(ys).values, torch.sort(data.y_train).values)


def test_loader_rejects_bad_batch_size(data):
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(data.x_train, data.y_train, 0)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_workload_maps_images_to_ten_logits_and_trains(name, data):
    model = build_model(name, seed=0)
    x, y = data.x_train[:16], data.y_train[:16]
    logits = model(x)
    assert logits.shape == (16, 10)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_init_depends_on_seed_only_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("mlp", seed=1)
    after = torch.rand(1)
    b = build_model("mlp", seed=1)
    c = build_model("mlp", seed=2)
    assert torch.equal(before, after)
    assert torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[1].weight, c[1].weight)


def test_architectures_have_the_specified_layers():
    mlp = build_model("mlp")
    assert [(m.in_features, m.out_features) for m in mlp if isinstance(m, nn.Linear)] == [
        (64, 128),
        (128, 128),
        (128, 10),
    ]
    cnn = build_model("cnn")
    convs = [m for m in cnn if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (1, 16, (1, 1)),
        (16, 32, (2, 2)),
    ]
    assert cnn[-1].in_features == 512


def test_vit_has_both_multihead_attention_and_linear_qkv_blocks():
    vit = build_model("vit")
    kinds = {type(m).__name__ for m in vit.modules()}
    assert "MultiheadAttention" in kinds and "LinearSelfAttention" in kinds
    assert any(isinstance(m, nn.LayerNorm) for m in vit.modules())


def test_unknown_workload_and_attention_raise_listing_valid_names():
    with pytest.raises(ValueError, match="mlp, cnn, vit"):
        build_model("resnet")
    with pytest.raises(ValueError, match="attention"):
        TinyViT(attention=("conv",))
