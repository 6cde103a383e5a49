"""Layer capture: find the layers a Kronecker-factored optimizer supports and turn their
inputs and output gradients into the rows ``a`` and ``g`` of SINGD's statistics
(docs/architecture.md, 'singd: the optimizer').

Shared by :class:`singd.SINGD` and the KFAC baseline. Three parts:

* :func:`unwrap_model` and :func:`find_layers`: which modules are supported (``nn.Linear``
  with any leading dims, ``nn.Conv2d``) and which trainable parameters are left for a
  first-order fallback (and why).
* :func:`input_rows`, :func:`grad_rows`, :func:`loss_average_count`: the pure row
  transforms (unfold, ``expand``/``reduce``, the ones column for a bias, the number of loss
  terms ``n`` the loss was averaged over), and their cheaper summaries for the ``expand``
  case that skip building the rows: :func:`input_square_sums` / :func:`grad_square_sums`
  (column sums of squares, all a diagonal factor needs) and :func:`conv_input_gram`
  (``a^T a`` of a Conv2d straight from its patches).
* :class:`Capture`: forward hooks that, while *attached* to a layer, register a tensor hook
  on the layer's output and call ``callback(name, input, grad_output)`` once per
  forward/backward pair. Tensor hooks registered before an in-place op on the output
  (``nn.ReLU(inplace=True)``) still receive the gradient w.r.t. the layer's own output.

Rows are returned *unnormalised*: the ``1/sqrt(rows)`` of ``a`` and the ``sqrt(n)`` of ``g``
are left to the caller, which knows how several backward passes are combined.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from singd.structures.base import cached_constant, symmetric_gram

#: Valid values of ``kfac_approx``.
KFAC_APPROXIMATIONS: tuple[str, ...] = ("expand", "reduce")
#: Valid values of ``loss_average``.
LOSS_AVERAGES: tuple[str | None, ...] = (None, "batch", "batch+sequence")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the layers: strips DDP/DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, repeatedly."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


#: Layer kinds :func:`find_layers` can return.
LAYER_KINDS: tuple[str, ...] = ("Linear", "Conv2d", "Conv1D", "Embedding", "MultiheadAttention")
#: The kinds returned unless a caller asks for more (the layers every optimizer handles).
BASIC_KINDS: tuple[str, ...] = ("Linear", "Conv2d")


@dataclass
class Layer:
    """A supported layer: weight ``W`` (d_C x d_in, conv kernels flattened) and optional bias.

    ``W`` is the weight as the Linear layer it acts as: ``transposed`` marks parameters stored
    as ``(d_in, d_C)`` (``transformers``' ``Conv1D``, ``nn.Embedding``), and ``weight_rows`` /
    ``bias_rows`` mark a layer that is a row block of a larger parameter (the q, k, v parts of
    ``nn.MultiheadAttention``'s packed ``in_proj_weight`` and ``in_proj_bias``).
    """

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    #: ``"Linear"``, ``"Conv2d"``, ``"Conv1D"``, ``"Embedding"`` or ``"MultiheadAttention"``
    #: (None: from the module's type)
    layer_kind: str | None = None
    transposed: bool = False
    weight_rows: slice | None = None
    bias_rows: slice | None = None
    #: structure K must have whatever the user chose (``"diagonal"`` for an embedding, whose
    #: input is one-hot: ``a^T a`` is the diagonal of token counts); None: the user's choice
    k_structure: str | None = None

    @property
    def kind(self) -> str:
        """``"Linear"``, ``"Conv2d"``, ``"Conv1D"``, ``"Embedding"`` or ``"MultiheadAttention"``."""
        if self.layer_kind is not None:
            return self.layer_kind
        return "Conv2d" if isinstance(self.module, nn.Conv2d) else "Linear"

    @property
    def sliced(self) -> bool:
        """Whether the layer's weight or bias is a row block of a larger parameter."""
        return self.weight_rows is not None or self.bias_rows is not None

    def _weight_part(self, t: Tensor) -> Tensor:
        """The layer's block of a tensor shaped like ``weight``."""
        return t if self.weight_rows is None else t[self.weight_rows]

    def _bias_part(self, t: Tensor) -> Tensor:
        """The layer's block of a tensor shaped like ``bias``."""
        return t if self.bias_rows is None else t[self.bias_rows]

    @property
    def in_dim(self) -> int:
        """d_K: flattened input size, plus one for the bias."""
        w = self._weight_part(self.weight)
        d_in = w.shape[0] if self.transposed else math.prod(w.shape[1:])
        return d_in + (self.bias is not None)

    @property
    def out_dim(self) -> int:
        """d_C: number of output features / channels."""
        w = self._weight_part(self.weight)
        return w.shape[1] if self.transposed else w.shape[0]

    def params(self) -> list[nn.Parameter]:
        """The layer's trainable parameters, weight first (whole parameters, also for a
        sliced layer: see :meth:`parts`)."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def parts(self, tensors: list[Tensor]) -> list[Tensor]:
        """The layer's blocks (views) of tensors shaped like ``params()``: the tensors
        themselves unless the layer is sliced."""
        if not self.sliced:
            return list(tensors)
        out = [self._weight_part(tensors[0])]
        if self.bias is not None:
            out.append(self._bias_part(tensors[1]))
        return out

    def grad_matrix(self) -> Tensor | None:
        """``[grad W, grad b]`` as a ``d_C x d_K`` matrix (a copy), or None without a gradient."""
        gw = self.weight.grad
        if gw is None:
            return None
        if gw.is_sparse:
            gw = gw.to_dense()
        gw = self._weight_part(gw)
        if self.transposed:
            gw = gw.T
        elif gw.dim() != 2:
            gw = gw.reshape(self.out_dim, -1)
        if self.bias is None:
            return gw.clone()
        gb = self.bias.grad
        if gb is None:
            gb = torch.zeros(self.out_dim, dtype=gw.dtype, device=gw.device)
        else:
            gb = self._bias_part(gb)
        if gb.dtype != gw.dtype:
            gb = gb.to(gw.dtype)
        return torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def diagonal_scales(self, left: Tensor, right: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Views of ``left`` (length d_C) and ``right`` (length d_K) that broadcast against
        ``parts(params())``: ``left_i * grad_i * right_i`` is ``diag(left) G diag(right)`` split
        like the parameters (no ``d_C x d_K`` matrix is formed)."""
        w = self._weight_part(self.weight)
        if self.transposed:
            n = w.shape[0]
            lefts, rights = [left.view(1, -1)], [right[:n].view(-1, 1)]
        else:
            n = math.prod(w.shape[1:])
            lefts = [left.view(-1, *([1] * (w.dim() - 1)))]
            rights = [right[:n].view(1, *w.shape[1:])]
        if self.bias is not None:
            lefts.append(left)
            rights.append(right[n])
        return lefts, rights

    def split(self, mat: Tensor) -> list[Tensor]:
        """Split a ``d_C x d_K`` matrix into tensors shaped like ``parts(params())`` (views
        where the strides allow: a Linear layer's are a slice and a column, a transposed
        layer's weight part a transposed slice)."""
        w_shape = self._weight_part(self.weight).shape
        n = mat.shape[1] - (self.bias is not None)
        w = mat if self.bias is None else mat[:, :n]
        if self.transposed:
            w = w.T
        elif len(w_shape) != 2:
            w = w.reshape(w_shape)
        return [w] if self.bias is None else [w, mat[:, n]]


@dataclass
class LayerSearch:
    """Result of :func:`find_layers`."""

    layers: dict[str, Layer] = field(default_factory=dict)
    #: Trainable parameters outside supported layers: qualified name -> (parameter, reason).
    others: dict[str, tuple[nn.Parameter, str]] = field(default_factory=dict)


def _is_hooked_linear(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> bool:
    """False for Linear modules whose forward is never called (MultiheadAttention.out_proj)."""
    parent = parents.get(name.rpartition(".")[0] if "." in name else "")
    return not (isinstance(parent, nn.MultiheadAttention) and name.endswith("out_proj"))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (a Linear storing its weight as
    ``(in, out)``, used by GPT-2), recognised by class name, package and weight shape without
    importing ``transformers``."""
    named = any(
        c.__name__ == "Conv1D" and c.__module__.split(".")[0] == "transformers"
        for c in type(module).__mro__
    )
    if not named:
        return False
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(w, nn.Parameter)
        and w.dim() == 2
        and getattr(module, "nf", w.shape[1]) == w.shape[1]
        and (b is None or (isinstance(b, nn.Parameter) and tuple(b.shape) == (w.shape[1],)))
    )


def _embedding_issue(module: nn.Embedding) -> str | None:
    """Why an embedding cannot be preconditioned (None: it can)."""
    if module.sparse:
        return "Embedding(sparse=True): sparse gradients are not preconditioned"
    if module.scale_grad_by_freq:
        return "Embedding(scale_grad_by_freq=True): its gradient is not a one-hot Linear's"
    return None


def _attention_parts(
    name: str, module: nn.MultiheadAttention
) -> list[tuple[str, str, nn.Parameter, nn.Parameter | None, slice | None, slice | None]]:
    """The projections of an ``nn.MultiheadAttention``: (layer name, role, weight, bias,
    weight rows, bias rows); the packed in-projection is split into its q, k, v blocks."""
    prefix = f"{name}." if name else ""
    E = module.embed_dim
    blocks = {r: slice(i * E, (i + 1) * E) for i, r in enumerate("qkv")}
    bias = module.in_proj_bias
    parts = []
    for r in "qkv":
        brows = None if bias is None else blocks[r]
        if module.in_proj_weight is not None:
            parts.append((f"{prefix}{r}_proj", r, module.in_proj_weight, bias, blocks[r], brows))
        else:
            weight = getattr(module, f"{r}_proj_weight")
            parts.append((f"{prefix}{r}_proj", r, weight, bias, None, brows))
    out = module.out_proj
    parts.append((f"{prefix}out_proj", "out", out.weight, out.bias, None, None))
    return parts


def find_layers(
    model: nn.Module, trainable: Iterable[nn.Parameter], kinds: Iterable[str] = BASIC_KINDS
) -> LayerSearch:
    """Supported layers whose weight is in ``trainable``, and the remaining trainable
    parameters with the reason they are not handled by a supported layer.

    ``kinds`` (a subset of :data:`LAYER_KINDS`) says which layers count as supported:
    ``nn.Linear`` and ``nn.Conv2d``; ``transformers``' ``Conv1D`` (transposed weight);
    ``nn.Embedding`` (one-hot input; not with ``sparse=True`` or ``scale_grad_by_freq=True``);
    ``nn.MultiheadAttention`` (layers ``<name>.q_proj``, ``.k_proj``, ``.v_proj`` for the
    blocks of the in-projection, packed or separate, and ``<name>.out_proj``; their rows come
    from the autograd graph of the attention's forward, see :class:`AttentionTap`). A layer
    needs a trainable weight and bias used by no other module: a parameter shared by several
    modules (tied weights) goes to the fallback, where it gets one update.
    """
    kinds = frozenset(kinds)
    unknown = kinds - set(LAYER_KINDS)
    if unknown:
        raise ValueError(f"kinds: unknown layer kinds {sorted(unknown)}; valid: {LAYER_KINDS}")
    model = unwrap_model(model)
    trainable_ids = {id(p) for p in trainable}
    owners: dict[int, int] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    search = LayerSearch()
    claimed: set[int] = set()

    def usable(weight: nn.Parameter | None, bias: nn.Parameter | None) -> bool:
        if weight is None or id(weight) not in trainable_ids or not weight.requires_grad:
            return False
        if bias is not None and not bias.requires_grad:
            return False
        return all(owners.get(id(p), 0) <= 1 for p in (weight, bias) if p is not None)

    def add(layer: Layer) -> None:
        search.layers[layer.name] = layer
        claimed.update(id(p) for p in layer.params())

    for name, module in modules.items():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            kind = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
            if kind not in kinds or (kind == "Conv2d" and module.weight.dim() != 4):
                continue
            if not _is_hooked_linear(name, module, modules):
                continue
            if usable(module.weight, module.bias):
                add(Layer(name, module, module.weight, module.bias))
        elif "Conv1D" in kinds and is_conv1d(module):
            if usable(module.weight, module.bias):
                add(Layer(name, module, module.weight, module.bias, "Conv1D", transposed=True))
        elif "Embedding" in kinds and isinstance(module, nn.Embedding):
            if _embedding_issue(module) is None and usable(module.weight, None):
                layer = Layer(name, module, module.weight, None, "Embedding", transposed=True)
                layer.k_structure = "diagonal"
                add(layer)
        elif "MultiheadAttention" in kinds and isinstance(module, nn.MultiheadAttention):
            tap = AttentionTap(module)
            for lname, role, weight, bias, wrows, brows in _attention_parts(name, module):
                if usable(weight, bias):
                    proj = AttentionProjection(tap, role, weight, bias, wrows)
                    add(Layer(lname, proj, weight, bias, "MultiheadAttention", False, wrows, brows))
    seen: set[int] = set()
    for mname, module in modules.items():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in trainable_ids or id(p) in claimed or id(p) in seen:
                continue
            seen.add(id(p))
            qual = f"{mname}.{pname}" if mname else pname
            reason = _reason(mname, module, modules, owners, p, kinds)
            search.others[qual] = (p, reason)
    return search


def _reason(
    name: str,
    module: nn.Module,
    modules: dict[str, nn.Module],
    owners: dict[int, int],
    p: nn.Parameter,
    kinds: frozenset[str] = frozenset(BASIC_KINDS),
) -> str:
    """Why a trainable parameter is not preconditioned (for the fallback warning)."""
    if owners.get(id(p), 0) > 1:
        return "shared by several modules"
    supported = isinstance(module, (nn.Linear, nn.Conv2d)) and (
        ("Conv2d" if isinstance(module, nn.Conv2d) else "Linear") in kinds
    )
    if isinstance(module, nn.Linear) and not _is_hooked_linear(name, module, modules):
        if "MultiheadAttention" not in kinds:
            return "MultiheadAttention.out_proj (its forward is never called)"
        supported = True
    if isinstance(module, nn.Embedding) and "Embedding" in kinds:
        issue = _embedding_issue(module)
        if issue is not None:
            return issue
        supported = True
    if isinstance(module, nn.MultiheadAttention) and "MultiheadAttention" in kinds:
        if p is module.bias_k or p is module.bias_v:
            return "MultiheadAttention.bias_k / bias_v (free parameters)"
        supported = True
    supported = supported or ("Conv1D" in kinds and is_conv1d(module))
    if supported:
        return "its layer's weight or bias is frozen"
    return f"{type(module).__name__} is not a supported layer"


# ---------------------------------------------------------------------- row transforms
def _conv_patches(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input patches ``(B, C_in * k1 * k2, L)`` of a Conv2d (any padding mode)."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        padding: tuple[int, ...] | int = 0
    else:
        padding = module.padding
    return F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )


#: Channels per group from which Conv2d ``expand`` rows (:func:`input_rows`,
#: :func:`conv_input_gram`) are built channels-last instead of by ``F.unfold``.
NHWC_MIN_CHANNELS = 2


def _padded_nhwc(module: nn.Conv2d, x: Tensor) -> Tensor:
    """A batched Conv2d input padded as the layer pads it, contiguous channels-last
    ``(B, H, W, C)`` (one copy)."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        return x.permute(0, 2, 3, 1).contiguous()
    ph, pw = module.padding
    x = x.permute(0, 2, 3, 1)
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    return x.contiguous()


def _nhwc_rows(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The ``expand`` rows ``(B * L * G, d)`` of a batched Conv2d input (no ones column),
    with features in channels-last order ``(kh, kw, c)``: one strided copy whose inner runs
    are ``kw * c`` contiguous values (``F.unfold`` copies per sample and element)."""
    xp = _padded_nhwc(module, x)
    B, H, W, C = xp.shape
    G = module.groups
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    oh = (H - dh * (kh - 1) - 1) // sh + 1
    ow = (W - dw * (kw - 1) - 1) // sw + 1
    b, h, w, c = xp.stride()
    view = xp.as_strided(
        (B, oh, ow, G, kh, kw, C // G), (b, h * sh, w * sw, c * (C // G), h * dh, w * dw, c)
    )
    return view.reshape(B * oh * ow * G, kh * kw * (C // G))


@functools.lru_cache(maxsize=64)
def _weight_order(kh: int, kw: int, c: int, device: torch.device) -> Tensor:
    """Indices that take channels-last features ``(kh, kw, c)`` to the weight's ``(c, kh, kw)``."""
    order = torch.arange(kh * kw * c, device=device).reshape(kh, kw, c).permute(2, 0, 1)
    return order.reshape(-1)


def input_rows(module: nn.Module, x: Tensor, kfac_approx: str = "expand") -> Tensor:
    """The layer input as rows ``(R, d_K)`` (unnormalised; ones column appended with a bias).

    Linear: ``expand`` flattens all leading dims into rows; ``reduce`` averages over the
    dims between the first (batch) and the last. Conv2d: unfolded patches, one row per
    (sample, output position, group) for ``expand``; averaged over output positions for
    ``reduce`` (one row per (sample, group)). Embedding: the one-hot rows of the indices
    (zero at ``padding_idx``, whose row gets no gradient), then as Linear.
    """
    if isinstance(module, nn.Embedding):
        rows = one_hot_rows(module, x)
        if kfac_approx == "expand" or x.dim() <= 1:
            return rows
        return rows.reshape(x.shape[0], -1, rows.shape[1]).mean(dim=1)
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        c = x.shape[1] // module.groups
        if kfac_approx == "expand" and c >= NHWC_MIN_CHANNELS:  # see conv_input_gram
            rows = _nhwc_rows(module, x)  # one column gather below beats unfold's copies
            rows = rows.index_select(1, _weight_order(*module.kernel_size, c, x.device))
            if module.bias is not None:
                rows = torch.cat(
                    [rows, _ones_column(rows.shape[0], rows.dtype, rows.device)], dim=1
                )
            return rows
        patches = _conv_patches(module, x)  # (B, G * d, L)
        B, _, L = patches.shape
        G = module.groups
        patches = patches.reshape(B, G, -1, L)
        if kfac_approx == "expand":
            rows = patches.permute(0, 3, 1, 2).reshape(B * L * G, -1)
        else:
            rows = patches.mean(dim=3).reshape(B * G, -1)
    else:
        d_in = x.shape[-1]
        if kfac_approx == "expand" or x.dim() <= 2:
            rows = x.reshape(-1, d_in)
        else:
            rows = x.reshape(x.shape[0], -1, d_in).mean(dim=1)
    if module.bias is not None:
        rows = torch.cat([rows, _ones_column(rows.shape[0], rows.dtype, rows.device)], dim=1)
    return rows


def grad_rows(module: nn.Module, grad_output: Tensor, kfac_approx: str = "expand") -> Tensor:
    """The gradient w.r.t. the layer output as rows ``(R, d_C)`` (unscaled): ``expand``
    flattens the weight-sharing dims into rows, ``reduce`` sums over them."""
    if isinstance(module, nn.Conv2d):
        g = grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)
        B, C = g.shape[:2]
        if kfac_approx == "expand":
            return g.reshape(B, C, -1).transpose(1, 2).reshape(-1, C)
        return g.reshape(B, C, -1).sum(dim=2)
    d_out = grad_output.shape[-1]
    if kfac_approx == "expand" or grad_output.dim() <= 2:
        return grad_output.reshape(-1, d_out)
    return grad_output.reshape(grad_output.shape[0], -1, d_out).sum(dim=1)


def conv_input_square_sums(module: nn.Conv2d, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Column sums of squares of a Conv2d's ``expand`` input rows (ones column included) and
    the row count, from the patches of the batch-summed squared input: no per-sample unfold."""
    x = (x if x.dim() == 4 else x.unsqueeze(0)).to(dtype)
    patches = _conv_patches(module, x.square().sum(0, keepdim=True))  # (1, G * d, L)
    G, L = module.groups, patches.shape[-1]
    sq = patches.sum(-1).reshape(G, -1).sum(0)
    rows = x.shape[0] * L * G
    if module.bias is not None:
        sq = torch.cat([sq, cached_constant((float(rows),), sq.dtype, sq.device)])
    return sq, rows


def conv_input_gram(module: nn.Conv2d, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """``a^T a`` of a Conv2d's ``expand`` input rows ``a`` (ones column included) and the
    row count, without the ones column (its block is the column sums and the count). With
    at least `NHWC_MIN_CHANNELS` channels per group the rows are built channels-last and
    the Gram reordered (one contiguous copy instead of ``F.unfold``'s strided patches); else
    from ``F.unfold``'s patches in one transposed copy."""
    x = (x if x.dim() == 4 else x.unsqueeze(0)).to(dtype)
    G = module.groups
    if x.shape[1] // G >= NHWC_MIN_CHANNELS:
        Y = _nhwc_rows(module, x)
        rows, d = Y.shape
        order = _weight_order(*module.kernel_size, x.shape[1] // G, x.device)
        core = symmetric_gram(Y).index_select(0, order).index_select(1, order)
        sums = Y.sum(0).index_select(0, order) if module.bias is not None else None
    else:
        patches = _conv_patches(module, x)  # (B, G * d, L)
        B, _, L = patches.shape
        if G == 1:
            X = patches.transpose(0, 1).reshape(patches.shape[1], B * L)
        else:
            X = patches.reshape(B, G, -1, L).permute(2, 0, 3, 1).reshape(-1, B * L * G)
        d, rows = X.shape
        core = symmetric_gram(X.T)
        sums = X.sum(1) if module.bias is not None else None
    if sums is None:
        return core, rows
    A = core.new_empty(d + 1, d + 1)
    A[:d, :d] = core
    A[:d, d] = sums
    A[d, :d] = sums
    A[d, d] = rows
    return A, rows


def conv_row_count(module: nn.Conv2d, grad_output: Tensor) -> int:
    """Number of ``expand`` rows of a Conv2d: samples x output positions x groups."""
    g = grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)
    return g.shape[0] * g.shape[2] * g.shape[3] * module.groups


def input_square_sums(module: nn.Module, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Column sums of squares of a layer's ``expand`` input rows (ones column included) and
    the row count, without building the rows (Conv2d: see :func:`conv_input_square_sums`)."""
    if isinstance(module, nn.Conv2d):
        return conv_input_square_sums(module, x, dtype)
    if isinstance(module, nn.Embedding):
        return token_counts(module, x, dtype), x.numel()
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dtype:
        x = x.to(dtype)
    rows = x.shape[0]
    sq = (x * x).sum(0)
    if module.bias is not None:
        sq = torch.cat([sq, cached_constant((float(rows),), sq.dtype, sq.device)])
    return sq, rows


def one_hot_rows(module: nn.Embedding, idx: Tensor) -> Tensor:
    """The one-hot rows ``(R, num_embeddings)`` of an embedding's indices in the weight's
    dtype: the input of the Linear layer the embedding is (zero at ``padding_idx``)."""
    rows = F.one_hot(idx.reshape(-1), module.num_embeddings).to(module.weight.dtype)
    if module.padding_idx is not None:
        rows[:, module.padding_idx] = 0
    return rows


def token_counts(module: nn.Embedding, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """How often each vocabulary entry occurs in ``idx`` (0 for ``padding_idx``): the column
    sums of squares of the one-hot rows, all a diagonal K needs."""
    counts = torch.bincount(idx.reshape(-1), minlength=module.num_embeddings).to(dtype)
    if module.padding_idx is not None:
        counts[module.padding_idx] = 0
    return counts


@functools.lru_cache(maxsize=16)
def _ones_column(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A shared ``(n, 1)`` column of ones, the bias column of the input rows (only ever
    read: ``torch.cat`` copies it)."""
    return torch.ones(n, 1, dtype=dtype, device=device)


def grad_square_sums(module: nn.Module, grad_output: Tensor, dtype: torch.dtype) -> Tensor:
    """Column sums of squares of a layer's ``expand`` gradient rows."""
    if isinstance(module, nn.Conv2d):
        g = (grad_output if grad_output.dim() == 4 else grad_output.unsqueeze(0)).to(dtype)
        return g.square().sum((0, 2, 3))
    g = grad_output if grad_output.dim() == 2 else grad_output.reshape(-1, grad_output.shape[-1])
    if g.dtype != dtype:
        g = g.to(dtype)
    return (g * g).sum(0)


def loss_average_count(module: nn.Module, grad_output: Tensor, loss_average: str | None) -> int:
    """``n``, the number of loss terms the loss was averaged over: the batch size for
    ``"batch"`` (first dim), batch times sequence / output positions for
    ``"batch+sequence"``, and 1 for None."""
    if loss_average is None:
        return 1
    if isinstance(module, nn.Conv2d):
        unbatched = grad_output.dim() == 3
        batch = 1 if unbatched else grad_output.shape[0]
        spatial = grad_output.shape[-2] * grad_output.shape[-1]
    else:
        unbatched = grad_output.dim() == 1
        batch = 1 if unbatched else grad_output.shape[0]
        spatial = max(grad_output.numel() // max(grad_output.shape[-1], 1), 1) // max(batch, 1)
    if loss_average == "batch":
        return int(batch)
    return int(batch * spatial)


# ---------------------------------------------------------------------- hooks
#: ``callback(layer_name, layer_input, grad_output)``, called inside backward.
CaptureCallback = Callable[[str, Tensor, Tensor], None]


def weak_method(method: Callable[..., None]) -> Callable[..., None]:
    """A callback that calls a bound method through a weak reference (a no-op once its
    object is gone), so hooks never keep an optimizer alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        target = ref()
        if target is not None:
            target(*args)

    return call


class Capture:
    """Forward hooks that hand each (input, output gradient) pair of attached layers to
    ``callback``; layers not attached cost nothing (no hook is registered on them).

    ``fired`` collects the names of attached layers whose forward hook ran since the last
    :meth:`clear_fired` (a layer with gradients but not in ``fired`` was never seen).
    """

    def __init__(self, modules: dict[str, nn.Module], callback: CaptureCallback) -> None:
        """Remember the layers (name -> module) and the callback; nothing is attached yet."""
        self.modules = dict(modules)
        self.callback = callback
        self.fired: set[str] = set()
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @property
    def attached(self) -> frozenset[str]:
        """Names of the layers whose hooks are registered."""
        return frozenset(self._handles)

    def attach(self, names: Iterable[str]) -> None:
        """Make exactly ``names`` attached (registers / removes hooks as needed)."""
        wanted = set(names)
        if wanted == self._handles.keys():
            return
        for name in list(self._handles):
            if name not in wanted:
                self._handles.pop(name).remove()
        for name in wanted:
            if name not in self._handles:
                module = self.modules[name]
                if isinstance(module, AttentionProjection):
                    self._handles[name] = module.tap.subscribe(
                        name, module, self.callback, self.fired
                    )
                else:
                    self._handles[name] = module.register_forward_hook(self._make_hook(name))

    def detach(self) -> None:
        """Remove every hook."""
        self.attach(())

    def clear_fired(self) -> None:
        """Forget which layers fired."""
        self.fired.clear()

    def _make_hook(self, name: str) -> Callable:
        """The forward hook for one layer: registers a tensor hook on its output."""
        callback, fired = self.callback, self.fired

        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor):
                return
            if not output.requires_grad or not args:
                return
            fired.add(name)
            x = args[0].detach()

            def tensor_hook(grad_output: Tensor) -> None:
                callback(name, x, grad_output)

            output.register_hook(tensor_hook)

        return forward_hook


# ---------------------------------------------------------------------- attention
#: Autograd nodes of ``F.linear`` whose saved operands are ``(input, weight^T)``; the value
#: is the attribute holding the saved input (the weight always requires grad, so it is saved).
_MATMUL_NODES = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}
#: Nodes between a matmul's weight operand and the parameter that keep its rows.
_PASS_NODES = frozenset(
    {"TBackward0", "TransposeBackward0", "ToCopyBackward0", "AliasBackward0", "CloneBackward0"}
)
_LEAF_NODE = "torch::autograd::AccumulateGrad"


class AttentionProjection:
    """One projection of an ``nn.MultiheadAttention`` (the q, k or v block of the
    in-projection, or ``out_proj``) as the "module" of a :class:`Layer`: a Linear with
    ``weight`` (``rows`` of it for a packed in-projection) and ``bias`` (None without), whose
    rows :class:`AttentionTap` finds in the attention's autograd graph."""

    def __init__(
        self,
        tap: AttentionTap,
        role: str,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        rows: slice | None,
    ) -> None:
        """Remember the attention's tap, the role (``"q"``, ``"k"``, ``"v"``, ``"out"``),
        the parameters and the weight rows (None: all)."""
        self.tap = tap
        self.role = role
        self.weight = weight
        self.bias = bias
        start = 0 if rows is None else rows.start
        stop = weight.shape[0] if rows is None else rows.stop
        self.rows = (start, stop)

    def __repr__(self) -> str:
        return f"AttentionProjection({self.role}, rows={self.rows})"


class _Subscription:
    """A removable registration of one layer with an :class:`AttentionTap`."""

    def __init__(self, tap: AttentionTap, key: object) -> None:
        self.tap, self.key = tap, key

    def remove(self) -> None:
        """Stop capturing this layer (the tap's hook goes when no layer is left)."""
        self.tap._unsubscribe(self.key)


class AttentionTap:
    """Captures the rows ``a`` and ``g`` of an ``nn.MultiheadAttention``'s projections.

    The module calls ``F.multi_head_attention_forward`` with its weights, so no projection
    has a forward of its own to hook. While some projection is subscribed, a forward hook on
    the attention walks the autograd graph of its outputs back to the inputs and finds the
    matrix products (``AddmmBackward0``/``MmBackward0``) whose weight operand comes from a
    projection's parameter (through transposes, dtype casts and the ``split``/``chunk`` of a
    packed weight, which give the row block). Their saved input operand is ``a`` (the
    projection input, no copy) and a pre-hook on the node receives the gradient w.r.t. the
    product, ``g``: exactly the rows of the Linear layer each projection is, for self- and
    cross-attention, packed or separate weights, with or without bias, either ``batch_first``.
    The module itself is never changed (same outputs, same ``state_dict``). Rows are handed
    on as ``(batch, sequence, features)`` (2-d for an unbatched input).
    """

    def __init__(self, module: nn.MultiheadAttention) -> None:
        """Remember the attention module; nothing is hooked yet."""
        self.module = module
        self._subscribers: dict[object, tuple[str, AttentionProjection, CaptureCallback, set]]
        self._subscribers = {}
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def subscribe(
        self, name: str, proj: AttentionProjection, callback: CaptureCallback, fired: set[str]
    ) -> _Subscription:
        """Hand the rows of ``proj`` to ``callback(name, a, g)`` once per forward/backward
        (and add ``name`` to ``fired`` on its forward) until the returned handle is removed."""
        key = object()
        self._subscribers[key] = (name, proj, callback, fired)
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._forward_hook, with_kwargs=True)
        return _Subscription(self, key)

    def _unsubscribe(self, key: object) -> None:
        """Drop one subscription; remove the forward hook with the last one."""
        self._subscribers.pop(key, None)
        if not self._subscribers and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Find the projection products of this forward and register their pre-hooks."""
        if not torch.is_grad_enabled() or not self._subscribers:
            return
        outputs = output if isinstance(output, tuple) else (output,)
        roots = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
        if not roots:
            return
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        inputs = dict(zip(names, args))
        inputs.update(kwargs)
        query = inputs.get("query")
        stops = {
            t.grad_fn
            for k in ("query", "key", "value", "attn_mask")
            if isinstance(t := inputs.get(k), Tensor) and t.grad_fn is not None
        }
        batch = None
        if isinstance(query, Tensor) and query.dim() == 3:
            batch = query.shape[0] if getattr(module, "batch_first", False) else query.shape[1]
        products = _projection_products(roots, stops)
        for node, saved, param, start, stop in products:
            served = []
            for name, proj, callback, fired in self._subscribers.values():
                p0, p1 = proj.rows
                if proj.weight is param and start <= p0 and p1 <= stop:
                    served.append((name, callback, p0 - start, p1 - start, stop - start))
                    fired.add(name)
            if served:
                node.register_prehook(_row_prehook(saved, batch, served))


def _weight_source(node: Any, output_nr: int) -> tuple[Tensor, int, int] | None:
    """The parameter behind a matmul's weight operand and the rows ``[start, stop)`` of it
    that the operand holds, or None when the operand does not come from a parameter."""
    start, length = 0, None
    while node is not None:
        kind = node.name()
        if kind == _LEAF_NODE:
            var = node.variable
            return var, start, start + (var.shape[0] - start if length is None else length)
        if kind in _PASS_NODES:
            node, output_nr = node.next_functions[0]
            continue
        if kind == "SplitWithSizesBackward0" and node._saved_dim == 0:
            sizes = list(node._saved_split_sizes)
            start += sum(sizes[:output_nr])
            length = sizes[output_nr] if length is None else length
        elif kind == "SplitBackward0" and node._saved_dim == 0:
            size, total = int(node._saved_split_size), int(node._saved_self_sym_sizes[0])
            start += size * output_nr
            length = min(size, total - size * output_nr) if length is None else length
        elif kind == "SliceBackward0" and node._saved_dim == 0 and node._saved_step == 1:
            total = int(node._saved_self_sym_sizes[0])
            lo = int(node._saved_start)
            lo = max(lo + total, 0) if lo < 0 else min(lo, total)
            hi = int(node._saved_end)
            hi = max(hi + total, 0) if hi < 0 else min(hi, total)
            start += lo
            length = hi - lo if length is None else length
        else:
            return None
        node, output_nr = node.next_functions[0]
    return None


def _projection_products(
    roots: list[Any], stops: set[Any]
) -> list[tuple[Any, Tensor, Tensor, int, int]]:
    """The matmul nodes between ``roots`` and ``stops`` whose weight operand comes from a
    parameter: ``(node, saved input, parameter, first row, end row)``. The walk does not go
    past ``stops`` (the attention's inputs) into the rest of the model."""
    found = []
    seen: set[Any] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        attr = _MATMUL_NODES.get(node.name())
        if attr is not None:
            weight_node, nr = node.next_functions[-1]
            source = _weight_source(weight_node, nr)
            saved = getattr(node, attr)
            if source is not None and isinstance(saved, Tensor):
                found.append((node, saved, *source))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def _row_prehook(
    saved: Tensor, batch: int | None, served: list[tuple[str, CaptureCallback, int, int, int]]
) -> Callable[[tuple], None]:
    """The pre-hook of one projection product: splits the gradient w.r.t. the product into
    the blocks of the layers it serves and hands them on with the product's input."""

    def rows(t: Tensor) -> Tensor:
        # rows are (sequence, batch) ordered: F.multi_head_attention_forward works seq-first
        if batch is None or t.shape[0] % batch:
            return t
        return t.reshape(t.shape[0] // batch, batch, t.shape[1]).transpose(0, 1)

    x = rows(saved.detach())

    def prehook(grad_outputs: tuple) -> None:
        g = grad_outputs[0]
        if g is None:
            return
        g = rows(g)
        for name, callback, c0, c1, width in served:
            callback(name, x, g if (c0, c1) == (0, width) else g[..., c0:c1])

    return prehook
