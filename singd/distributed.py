"""Data-parallel support: average SINGD's statistics across ranks in bucketed collectives.

The *distributor* is kept apart from the math. :class:`singd.SINGD` finalises the
statistics ``H_K = Pi(K^T a^T a K)`` and ``H_C = Pi(C^T g^T g C)`` of every layer that
updates its preconditioner in a step and hands all of their stored tensors, in one call, to
its ``reduce_statistics(tensors, average)`` callable. :class:`StatisticsReducer` packs them
into one flat buffer per communication dtype, runs one ``all_reduce`` per buffer and writes
the result back: the mean over ranks where ``average[i]`` is true, the sum elsewhere. Steps
that do not update a preconditioner make no call, hence no collective.

Why the mean (see docs/architecture.md, 'singd: the optimizer'): ``a`` is scaled by
``1/sqrt(rows)``, so ``H_K`` is a mean over rows; ``g`` is the gradient of a per-rank loss
averaged over ``n`` terms, scaled by ``sqrt(n)``, so ``H_C = (1/n) sum_i dl_i dl_i^T`` is a
mean over loss terms too. Averaging these means over ranks gives each rank's rows the weight
``1/(R n_r)``, exactly the weight DDP's gradient averaging gives them: with equal shards
this is the full batch, with unequal shards it is the objective DDP optimises. With
``loss_average=None`` (a sum loss) ``H_C`` is a sum over loss terms, so it is summed over
ranks (``H_K`` is still averaged).

**Work sharing** (``StatisticsReducer(share_work=True)``, off by default): after the
statistics are reduced, each rank runs the preconditioner update (``riemannian_step``) only
for its share of the layers, assigned greedily by cost (stored entries to the power 1.5:
``d^3`` for dense factors), and one ``all_gather`` per dtype hands every rank the new K, C
(and momenta ``m_K``, ``m_C``, so that any rank can write a checkpoint); the Gram caches
(T > 1) are still computed on every rank. It can pay only where the update is cubic and the
copy quadratic: wide dense (or ``tril``/``triu``) factors updated often; measured in
``benchmarks/RESULTS.md``, section Data-parallel. The result is bitwise the same as without
sharing.

:func:`default_reducer` is what SINGD installs at construction: a reducer when
``torch.distributed`` is initialised with more than one rank (the DDP model's process group
when the model is DDP-wrapped), None otherwise. Set ``optimizer.reduce_statistics`` to your
own reducer (or to None, for rank-local preconditioners) to override it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from singd.structures import StructuredMatrix

#: Dtypes reduced in a float32 buffer (summing in half precision loses digits and fp16 can
#: overflow; gloo has no bf16 reduction on every build).
_UPCAST = (torch.float16, torch.bfloat16)
#: Fingerprint entries (tensor count and total size, modulo this) appended to each float32 /
#: float64 buffer to catch ranks whose statistics differ.
_CHECK_MOD = 65521


@dataclass
class ReduceCounters:
    """What a reducer has communicated: calls, collectives and payload bytes (cumulative)."""

    calls: int = 0
    collectives: int = 0
    bytes: int = 0


class StatisticsReducer:
    """Averages (or sums) a list of tensors in place across the ranks of a process group,
    with one ``all_reduce`` per communication dtype.

    ``group``: the process group (None: the default group). ``upcast_half``: reduce fp16 and
    bf16 tensors in the float32 buffer (default) instead of their own dtype. ``share_work``:
    SINGD updates each layer's K and C on one rank only and :meth:`share_factors` copies them
    to the others (see the module docstring). ``counters`` records calls, collectives and
    bytes sent per rank (the payload of each collective). Each float32/float64 buffer carries
    two check entries (tensor count and size) so that ranks passing different statistics
    raise a RuntimeError instead of silently diverging (reading them back is one device sync
    per update step on a GPU).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        upcast_half: bool = True,
        share_work: bool = False,
    ) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup or None, got "
                f"{type(group).__name__}"
            )
        if not isinstance(upcast_half, bool):
            raise TypeError(f"upcast_half must be True or False, got {upcast_half!r}")
        if not isinstance(share_work, bool):
            raise TypeError(f"share_work must be True or False, got {share_work!r}")
        self.group = group
        self.upcast_half = upcast_half
        self.share_work = share_work
        self.counters = ReduceCounters()

    def world_size(self) -> int:
        """Number of ranks in the group (1 when torch.distributed is not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def _comm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the buffer that carries tensors of ``dtype``."""
        return torch.float32 if self.upcast_half and dtype in _UPCAST else dtype

    def __call__(self, tensors: Sequence[Tensor], average: Sequence[bool] | None = None) -> None:
        """Reduce ``tensors`` in place: mean over ranks where ``average[i]`` (default: all),
        sum elsewhere. Every rank must pass tensors of the same shapes and dtypes, in order."""
        tensors = list(tensors)
        if average is None:
            average = [True] * len(tensors)
        else:
            average = list(average)
            if len(average) != len(tensors):
                raise ValueError(
                    f"average must have one bool per tensor ({len(tensors)}), got {len(average)}"
                )
        for t in tensors:
            if not isinstance(t, Tensor):
                raise TypeError(f"tensors must be torch.Tensors, got {type(t).__name__}")
        self.counters.calls += 1
        world = self.world_size()
        if world == 1 or not tensors:
            return
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            buckets.setdefault((self._comm_dtype(t.dtype), t.device), []).append(i)
        for (dtype, device), idx in buckets.items():
            parts = [tensors[i].reshape(-1).to(dtype) for i in idx]
            numel = sum(p.numel() for p in parts)
            # two small integers, exact in float32/64 even when summed over all ranks
            checked = dtype in (torch.float32, torch.float64)
            mod = max(2, min(_CHECK_MOD, (1 << 24) // world - 1))
            check = torch.tensor(
                [float(len(idx) % mod), float(numel % mod)] if checked else [],
                dtype=dtype,
                device=device,
            )
            buf = torch.cat([*parts, check])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            self.counters.collectives += 1
            self.counters.bytes += buf.numel() * buf.element_size()
            if checked and not torch.equal(buf[numel:], check * world):
                raise RuntimeError(
                    "SINGD: ranks reduced different statistics (layers updated on one rank but "
                    "not on another, e.g. a layer skipped in forward on some ranks, or "
                    "different param groups / T); K and C would diverge across ranks"
                )
            offset = 0
            inv = 1.0 / world
            for i in idx:
                t = tensors[i]
                n = t.numel()
                chunk = buf[offset : offset + n].view(t.shape)
                if average[i]:
                    chunk.mul_(inv)
                t.copy_(chunk)
                offset += n

    def owners(self, factors: Sequence[Sequence[StructuredMatrix]]) -> list[int]:
        """The rank that updates each layer (``factors[i]``: that layer's K and C): greedy
        longest-first assignment by cost ``numel ** 1.5``, the same on every rank."""
        world = self.world_size()
        cost = [sum(float(F.numel()) ** 1.5 for F in fs) for fs in factors]
        load = [0.0] * world
        owner = [0] * len(cost)
        for i in sorted(range(len(cost)), key=lambda i: (-cost[i], i)):
            r = min(range(world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += cost[i]
        return owner

    def rank(self) -> int:
        """This process's rank in the group (0 without torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.group)

    def share_factors(
        self, factors: Sequence[Sequence[StructuredMatrix]], owners: Sequence[int]
    ) -> None:
        """Copy every layer's matrices (K, C and the momenta, in place) from the rank that
        owns the layer to all others: one ``all_gather`` per dtype, padded to the largest share."""
        if len(factors) != len(owners):
            raise ValueError(
                f"owners must have one rank per layer ({len(factors)}), got {len(owners)}"
            )
        world = self.world_size()
        if world == 1:
            return
        me = self.rank()
        # (dtype, device) -> per rank: list of stored tensors that rank sends, in order
        buckets: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
        for fs, r in zip(factors, owners):
            for F in fs:
                for t in F._tensors():
                    key = (t.dtype, t.device)
                    buckets.setdefault(key, [[] for _ in range(world)])[r].append(t)
        for (dtype, device), per_rank in buckets.items():
            sizes = [sum(t.numel() for t in ts) for ts in per_rank]
            width = max(sizes)
            if width == 0:
                continue
            mine = per_rank[me]
            send = torch.zeros(width, dtype=dtype, device=device)
            if mine:
                send[: sizes[me]].copy_(torch.cat([t.reshape(-1) for t in mine]))
            recv = [torch.empty_like(send) for _ in range(world)]
            dist.all_gather(recv, send, group=self.group)
            self.counters.collectives += 1
            self.counters.bytes += send.numel() * send.element_size()
            for r, ts in enumerate(per_rank):
                if r == me:
                    continue
                offset = 0
                for t in ts:
                    n = t.numel()
                    t.copy_(recv[r][offset : offset + n].view(t.shape))
                    offset += n


def default_reducer(model: nn.Module | None = None) -> StatisticsReducer | None:
    """The reducer SINGD installs by default: one over the DDP model's process group (or the
    default group) when torch.distributed is initialised with more than one rank, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        group = getattr(model, "process_group", None)
        if group is not None and not isinstance(group, dist.ProcessGroup):
            group = None
    reducer = StatisticsReducer(group)
    return reducer if reducer.world_size() > 1 else None
