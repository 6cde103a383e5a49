"""Layer capture: find the layers a Kronecker-factored optimizer supports and turn their
inputs and output gradients into the rows ``a`` and ``g`` of DESIGN section 2.

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


@dataclass
class Layer:
    """A supported layer: weight ``W`` (d_C x d_in, conv kernels flattened) and optional bias."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def kind(self) -> str:
        """``"Linear"`` or ``"Conv2d"``."""
        return "Conv2d" if isinstance(self.module, nn.Conv2d) else "Linear"

    @property
    def in_dim(self) -> int:
        """d_K: flattened input size, plus one for the bias."""
        return math.prod(self.weight.shape[1:]) + (self.bias is not None)

    @property
    def out_dim(self) -> int:
        """d_C: number of output features / channels."""
        return self.weight.shape[0]

    def params(self) -> list[nn.Parameter]:
        """The layer's trainable parameters, weight first."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def grad_matrix(self) -> Tensor | None:
        """``[grad W, grad b]`` as a ``d_C x d_K`` matrix (a copy), or None without a gradient."""
        gw = self.weight.grad
        if gw is None:
            return None
        if gw.dim() != 2:
            gw = gw.reshape(self.out_dim, -1)
        if self.bias is None:
            return gw.clone()
        gb = self.bias.grad
        if gb is None:
            gb = torch.zeros(self.out_dim, dtype=gw.dtype, device=gw.device)
        if gb.dtype != gw.dtype:
            gb = gb.to(gw.dtype)
        return torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def diagonal_scales(self, left: Tensor, right: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Views of ``left`` (length d_C) and ``right`` (length d_K) that broadcast against
        ``params()``: ``left_i * grad_i * right_i`` is ``diag(left) G diag(right)`` split like
        the parameters (no ``d_C x d_K`` matrix is formed)."""
        w = self.weight
        n = math.prod(w.shape[1:])
        lefts = [left.view(-1, *([1] * (w.dim() - 1)))]
        rights = [right[:n].view(1, *w.shape[1:])]
        if self.bias is not None:
            lefts.append(left)
            rights.append(right[n])
        return lefts, rights

    def split(self, mat: Tensor) -> list[Tensor]:
        """Split a ``d_C x d_K`` matrix into tensors shaped like ``params()`` (views where
        the strides allow: a Linear layer's are a slice and a column)."""
        if self.bias is None:
            return [mat if self.weight.dim() == 2 else mat.reshape(self.weight.shape)]
        n = mat.shape[1] - 1
        w = mat[:, :n] if self.weight.dim() == 2 else mat[:, :n].reshape(self.weight.shape)
        return [w, mat[:, n]]


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


def find_layers(model: nn.Module, trainable: Iterable[nn.Parameter]) -> LayerSearch:
    """Supported layers whose weight is in ``trainable``, and the remaining trainable
    parameters with the reason they are not handled by a supported layer.

    A layer is supported when it is an ``nn.Linear`` or ``nn.Conv2d`` (not the ``out_proj`` of
    an ``nn.MultiheadAttention``, whose forward never runs), its weight is trainable, and its
    weight and bias are used by no other module (tied parameters go to the fallback).
    """
    model = unwrap_model(model)
    trainable_ids = {id(p) for p in trainable}
    owners: dict[int, int] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    search = LayerSearch()
    claimed: set[int] = set()
    for name, module in modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(module, nn.Conv2d) and module.weight.dim() != 4:
            continue
        weight, bias = module.weight, module.bias
        if id(weight) not in trainable_ids or not weight.requires_grad:
            continue
        if not _is_hooked_linear(name, module, modules):
            continue
        if bias is not None and not bias.requires_grad:
            continue
        if any(owners.get(id(p), 0) > 1 for p in (weight, bias) if p is not None):
            continue
        search.layers[name] = Layer(name, module, weight, bias)
        claimed.update(id(p) for p in (weight, bias) if p is not None)
    seen: set[int] = set()
    for mname, module in modules.items():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in trainable_ids or id(p) in claimed or id(p) in seen:
                continue
            seen.add(id(p))
            qual = f"{mname}.{pname}" if mname else pname
            reason = _reason(mname, module, modules, owners, p)
            search.others[qual] = (p, reason)
    return search


def _reason(
    name: str,
    module: nn.Module,
    modules: dict[str, nn.Module],
    owners: dict[int, int],
    p: nn.Parameter,
) -> str:
    """Why a trainable parameter is not preconditioned (for the fallback warning)."""
    if owners.get(id(p), 0) > 1:
        return "shared by several modules"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if not _is_hooked_linear(name, module, modules):
            return "MultiheadAttention.out_proj (its forward is never called)"
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
    ``reduce`` (one row per (sample, group)).
    """
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
    the Gram reordered (CNN 16->32 3x3 stride 2 on 8x8, batch 128: 2.8 -> 1.2 ms); else
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
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != dtype:
        x = x.to(dtype)
    rows = x.shape[0]
    sq = (x * x).sum(0)
    if module.bias is not None:
        sq = torch.cat([sq, cached_constant((float(rows),), sq.dtype, sq.device)])
    return sq, rows


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
                self._handles[name] = self.modules[name].register_forward_hook(
                    self._make_hook(name)
                )

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
