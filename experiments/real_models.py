"""Real-model workloads: the architectures users bring, small, random-init, on embedded data.

Hugging Face ``transformers`` models built from configs (never downloaded: ``HF_HUB_OFFLINE``
is set and nothing calls ``from_pretrained``) and a model on ``nn.MultiheadAttention``:

- ``"llama"``: a 2-layer Llama causal LM (hidden 64, grouped-query attention), untied head.
- ``"gpt2"``: a 2-layer GPT-2 LM (``Conv1D`` projections; the token embedding is tied to the
  LM head).
- ``"mha-lm"``: embedding, a free positional ``nn.Parameter``, a 2-layer
  ``nn.TransformerEncoder`` (``nn.MultiheadAttention``, causal mask), LayerNorm, Linear head.
- ``"vit"``: a 2-layer ViT classifier on digits resized to 16x16 (4x4 patches).
- ``"resnet"``: a 2-stage basic-block ResNet classifier on digits resized to 16x16.

Language models train on :func:`markov_language`, a seeded sparse Markov chain over a small
vocabulary (each token has a few likely successors), so the loss can fall far below
``log(vocab)``. Vision models train on scikit-learn's digits
(:func:`experiments.workloads.load_digits_data`) resized by ``F.interpolate``. Every builder
returns a :class:`RealWorkload`: the model, fixed train and evaluation batches and the loss.
``transformers`` is the optional ``models`` extra; it is imported only by the builders that
need it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.workloads import load_digits_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: A batch: model inputs and targets (token ids are their own targets for the LMs).
Batch = tuple[Tensor, Tensor]
#: ``loss(model, inputs, targets)``: the scalar training loss of one batch.
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

VOCAB = 64
SEQUENCE = 32
IMAGE = 16


@dataclass
class RealWorkload:
    """A model with its fixed train and evaluation batches and its loss function."""

    name: str
    model: nn.Module
    train: list[Batch]
    eval: list[Batch]
    loss_fn: LossFn

    def loss(self, batch: Batch) -> Tensor:
        """The training loss of one batch (with autograd)."""
        return self.loss_fn(self.model, *batch)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the evaluation batches (eval mode, restored afterwards)."""
        was_training = self.model.training
        self.model.eval()
        try:
            losses = [float(self.loss_fn(self.model, x, y)) for x, y in self.eval]
        finally:
            self.model.train(was_training)
        return sum(losses) / len(losses)


# ---------------------------------------------------------------------- data


def markov_language(
    num_sequences: int,
    length: int = SEQUENCE,
    vocab: int = VOCAB,
    successors: int = 3,
    seed: int = 0,
) -> Tensor:
    """``(num_sequences, length)`` token ids from a seeded sparse Markov chain: every token
    has ``successors`` possible next tokens with fixed random probabilities (the chain,
    fixed by ``vocab`` and ``successors``, is the same for every ``seed``; ``seed`` picks
    the sequences). The entropy rate is at most ``log(successors)``."""
    chain = torch.Generator().manual_seed(12345)
    nxt = torch.stack([torch.randperm(vocab, generator=chain)[:successors] for _ in range(vocab)])
    probs = torch.rand(vocab, successors, generator=chain) + 0.2
    probs = probs / probs.sum(1, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.empty(num_sequences, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=gen)
    for t in range(1, length):
        choice = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
        tokens[:, t] = nxt[tokens[:, t - 1], choice]
    return tokens


def language_batches(
    batches: int, batch_size: int, seed: int, length: int = SEQUENCE
) -> list[Batch]:
    """Fixed LM batches ``(ids, ids)`` from :func:`markov_language`."""
    ids = markov_language(batches * batch_size, length=length, seed=seed)
    return [(b, b) for b in ids.split(batch_size)]


def digit_batches(split: str, batch_size: int, size: int = IMAGE) -> list[Batch]:
    """Digits images of ``split`` resized (bilinear) to ``size x size``, in fixed batches."""
    x, y = load_digits_data().split(split)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return list(zip(x.split(batch_size), y.split(batch_size)))


# ---------------------------------------------------------------------- losses


def hf_lm_loss(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of a Hugging Face causal LM (it shifts the labels)."""
    return model(input_ids=ids, labels=labels).loss


def hf_classifier_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of a Hugging Face image classifier's logits."""
    return F.cross_entropy(model(pixel_values=x).logits, y)


def lm_loss(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of a model mapping ids to logits ``(B, L, vocab)``."""
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# ---------------------------------------------------------------------- models


class MHALanguageModel(nn.Module):
    """A causal transformer LM on ``nn.MultiheadAttention``: token embedding plus a free
    positional parameter, ``nn.TransformerEncoder`` layers, final LayerNorm, Linear head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(SEQUENCE, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``(B, L, vocab)`` of token ids ``(B, L)``."""
        L = ids.shape[1]
        h = self.embed(ids) + self.pos[:L]
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=h.dtype)
        h = self.encoder(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


def _transformers():
    """The ``transformers`` package (the optional ``models`` extra), with a clear error."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Hugging Face workloads need transformers: pip install -e '.[models]'"
        ) from err
    return transformers


def _language_workload(
    name: str, model: nn.Module, seed: int, batches: int, batch_size: int, loss: Callable
) -> RealWorkload:
    """A language-model workload: ``batches`` training batches of the Markov language and two
    evaluation batches from another seed."""
    return RealWorkload(
        name,
        model,
        language_batches(batches, batch_size, seed),
        language_batches(2, batch_size, seed + 1000),
        loss,
    )


def build_llama(seed: int = 0, batch_size: int = 16, batches: int = 8) -> RealWorkload:
    """A 2-layer Llama causal LM (hidden 64, 4 heads, 2 key/value heads) on the Markov
    language."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQUENCE,
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(config)
    return _language_workload("llama", model, seed, batches, batch_size, hf_lm_loss)


def build_gpt2(seed: int = 0, batch_size: int = 16, batches: int = 8) -> RealWorkload:
    """A 2-layer GPT-2 LM (embedding 64, 4 heads; token embedding tied to the head) on the
    Markov language."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQUENCE,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    model = tf.GPT2LMHeadModel(config)
    return _language_workload("gpt2", model, seed, batches, batch_size, hf_lm_loss)


def build_mha_lm(seed: int = 0, batch_size: int = 16, batches: int = 8) -> RealWorkload:
    """:class:`MHALanguageModel` (2 layers, dim 64) on the Markov language."""
    torch.manual_seed(seed)
    return _language_workload("mha-lm", MHALanguageModel(), seed, batches, batch_size, lm_loss)


def build_vit(seed: int = 0, batch_size: int = 32, batches: int = 8) -> RealWorkload:
    """A 2-layer ViT classifier (hidden 64, 4x4 patches) on 16x16 digits."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.ViTConfig(
        image_size=IMAGE,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = tf.ViTForImageClassification(config)
    return RealWorkload(
        "vit",
        model,
        digit_batches("train", batch_size)[:batches],
        digit_batches("val", 128)[:2],
        hf_classifier_loss,
    )


def build_resnet(seed: int = 0, batch_size: int = 32, batches: int = 8) -> RealWorkload:
    """A ResNet classifier (basic blocks, two stages of widths 16 and 32) on 16x16 digits."""
    tf = _transformers()
    torch.manual_seed(seed)
    config = tf.ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    model = tf.ResNetForImageClassification(config)
    return RealWorkload(
        "resnet",
        model,
        digit_batches("train", batch_size)[:batches],
        digit_batches("val", 128)[:2],
        hf_classifier_loss,
    )


#: Builders by workload name.
REAL_WORKLOADS: dict[str, Callable[..., RealWorkload]] = {
    "llama": build_llama,
    "gpt2": build_gpt2,
    "mha-lm": build_mha_lm,
    "vit": build_vit,
    "resnet": build_resnet,
}


def build_real_workload(name: str, seed: int = 0, **kwargs: int) -> RealWorkload:
    """The workload ``name`` (one of :data:`REAL_WORKLOADS`) with its seed."""
    if name not in REAL_WORKLOADS:
        raise ValueError(f"name must be one of {sorted(REAL_WORKLOADS)}, got {name!r}")
    return REAL_WORKLOADS[name](seed=seed, **kwargs)


def entropy_rate_bound(successors: int = 3) -> float:
    """``log(successors)``: the Markov language's entropy rate is at most this (nats)."""
    return math.log(successors)
