"""Embedded workloads: the scikit-learn digits data set and three small models.

Everything here runs offline (``sklearn.datasets.load_digits`` ships its 1797 8x8
images inside the package) and trains in seconds on a CPU.

Data: :func:`load_digits_data` returns fixed, stratified train / validation / test
splits (the split never depends on the training seed), normalised with the training
split's pixel mean and standard deviation, as ``(N, 1, 8, 8)`` float tensors.
:class:`BatchLoader` iterates over a split in a deterministic, seeded order.

Models (:func:`build_model` by name, see :data:`WORKLOADS`):

- ``"mlp"``: Flatten, Linear 64-128, ReLU, Linear 128-128, ReLU, Linear 128-10.
- ``"cnn"``: Conv(1->16, 3x3, pad 1), ReLU, Conv(16->32, 3x3, stride 2, pad 1), ReLU,
  Flatten, Linear(512->10).
- ``"vit"``: a tiny vision transformer on 2x2 patches (16 tokens) with two attention
  blocks, the first built on ``nn.MultiheadAttention`` (whose parameters SINGD and KFAC
  train with their first-order fallback) and the second on ``nn.Linear`` q/k/v/out
  projections (which they precondition). ``"vit-mha"`` and ``"vit-linear"`` use only one
  kind of block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Fraction of all 1797 images held out as the test split.
TEST_FRACTION = 0.2
#: Fraction of the remaining (training) images carved out as the validation split.
VAL_FRACTION = 0.2
#: Seed of the fixed train / validation / test split (independent of training seeds).
SPLIT_SEED = 0

ATTENTION_KINDS = ("mha", "linear")


@dataclass(frozen=True)
class DigitsData:
    """The digits splits as tensors: images ``(N, 1, 8, 8)`` float32, labels ``(N,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """Images and labels of the split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be one of 'train', 'val', 'test', got {name!r}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


_DATA_CACHE: dict[tuple[float, float, int], DigitsData] = {}


def load_digits_data(
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
    split_seed: int = SPLIT_SEED,
) -> DigitsData:
    """Load digits as fixed stratified train/val/test splits, normalised by train statistics."""
    for name, frac in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {frac!r}")
    key = (float(test_fraction), float(val_fraction), int(split_seed))
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype("float32")  # (1797, 8, 8), values 0..16
    labels = digits.target.astype("int64")
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, stratify=y_rest, random_state=split_seed
    )
    mean = float(x_train.mean())
    std = float(x_train.std())

    def prep(x, y) -> tuple[Tensor, Tensor]:
        xt = (torch.from_numpy(x) - mean) / std
        return xt.unsqueeze(1).contiguous(), torch.from_numpy(y)

    data = DigitsData(
        *prep(x_train, y_train), *prep(x_val, y_val), *prep(x_test, y_test), mean=mean, std=std
    )
    _DATA_CACHE[key] = data
    return data


class BatchLoader:
    """Deterministic mini-batches over tensors: epoch ``e`` uses permutation seed ``seed + e``."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int = 64,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


class MLP(nn.Sequential):
    """The 64-128-128-10 ReLU MLP."""

    def __init__(self, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


class CNN(nn.Sequential):
    """Conv(1->16) ReLU Conv(16->32, stride 2) ReLU Flatten Linear(512->10) on 1x8x8 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, num_classes),
        )


class LinearSelfAttention(nn.Module):
    """Multi-head self-attention from four ``nn.Linear`` layers (q, k, v, out)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the token dimension of ``x`` (batch, tokens, dim)."""
        b, t, d = x.shape

        def heads(z: Tensor) -> Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MHASelfAttention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (its parameters are not Linear hooks)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the token dimension of ``x`` (batch, tokens, dim)."""
        return self.attn(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, attention: str) -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (
            MHASelfAttention(dim, heads) if attention == "mha" else LinearSelfAttention(dim, heads)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens ``x`` (batch, tokens, dim)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A tiny vision transformer for 1x8x8 images: patches, attention blocks, mean pooling."""

    def __init__(
        self,
        patch: int = 2,
        dim: int = 32,
        heads: int = 2,
        mlp_ratio: int = 2,
        attention: Sequence[str] = ("mha", "linear"),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if patch not in (1, 2, 4, 8):
            raise ValueError(f"patch must divide 8 (1, 2, 4 or 8), got {patch!r}")
        if isinstance(attention, str) or len(attention) == 0:
            raise ValueError(f"attention must be a non-empty sequence of {ATTENTION_KINDS}")
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, kind) for kind in attention)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images ``x`` of shape (batch, 1, 8, 8)."""
        p = self.patch
        b = x.shape[0]
        # (b, 1, 8, 8) -> (b, tokens, p*p)
        x = x.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


#: Workload names accepted by :func:`build_model`, with a one-line description.
WORKLOADS: dict[str, str] = {
    "mlp": "MLP 64-128-128-10 (ReLU)",
    "cnn": "CNN Conv(1->16) Conv(16->32, stride 2) Linear(512->10)",
    "vit": "tiny ViT, 2x2 patches, one nn.MultiheadAttention block + one nn.Linear q/k/v block",
    "vit-mha": "tiny ViT with two nn.MultiheadAttention blocks",
    "vit-linear": "tiny ViT with two nn.Linear q/k/v blocks",
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A freshly initialised workload model (float32, CPU), seeded without touching global RNG."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid names: {', '.join(WORKLOADS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return MLP()
        if name == "cnn":
            return CNN()
        attention = {"vit": ("mha", "linear"), "vit-mha": ("mha", "mha")}.get(
            name, ("linear", "linear")
        )
        return TinyViT(attention=attention)
