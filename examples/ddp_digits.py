"""Train the digits MLP with SINGD under DistributedDataParallel (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_digits.py --epochs 5
    python examples/ddp_digits.py --epochs 5          # one process, same global batches

Every rank draws the same global batch (same seed) and trains on its own slice of it, so the
2-rank run follows the 1-process run on the full batch (up to float32 round-off). SINGD
finds the DDP wrapper itself, hooks the inner module and, because ``torch.distributed`` is
initialised, averages its statistics across ranks in one bucketed ``all_reduce`` per update
step: K and C stay bitwise identical on every rank, which the script checks at the end.
``--checkpoint PATH`` makes rank 0 save model and optimizer (every rank can load it).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from experiments.workloads import BatchLoader, build_model, load_digits_data
from singd import SINGD


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-cov", type=float, default=0.01)
    p.add_argument("--T", type=int, default=5, help="update K and C every T steps")
    p.add_argument("--structures", nargs=2, default=["dense", "dense"], metavar=("K", "C"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--checkpoint", default=None, help="rank 0 saves model + optimizer here")
    return p.parse_args()


def factor_checksum(opt: SINGD) -> torch.Tensor:
    """Sum of all K and C entries, in float64 (equal across ranks iff the factors agree)."""
    total = torch.zeros((), dtype=torch.float64)
    for lf in opt.preconditioner_factors().values():
        for key in ("K", "C"):
            total += lf.factors[key].dense().double().sum()
    return total


def main() -> None:
    """Train, report test accuracy from rank 0, check the factors agree across ranks."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by {world} ranks")
    shard = args.batch_size // world

    data = load_digits_data()
    model = build_model("mlp", seed=0)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = SINGD(
        net,
        lr=args.lr,
        lr_cov=args.lr_cov,
        T=args.T,
        structures=tuple(args.structures),
        warn_unsupported=False,
    )
    loader = BatchLoader(*data.split("train"), batch_size=args.batch_size, seed=0, drop_last=True)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        total, count = torch.zeros(2), 0
        for x, y in loader:
            x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach(), torch.tensor(1.0)])
            count += 1
        if distributed:
            dist.all_reduce(total)
        with torch.no_grad():
            xt, yt = data.split("test")
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        if rank == 0:
            print(
                f"epoch {epoch + 1}: train loss {total[0] / total[1]:.4f}, "
                f"test accuracy {acc:.3f} ({world} rank(s), {time.perf_counter() - start:.1f} s)"
            )
    checksum = factor_checksum(opt)
    if distributed:
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(sums, checksum)
        same = all(torch.equal(s, sums[0]) for s in sums)
        if rank == 0:
            print(f"K and C identical on all {world} ranks: {same}")
            counters = opt.reduce_statistics.counters
            print(
                f"statistics reduced on {counters.calls} update steps in {counters.collectives} "
                f"collectives, {counters.bytes / 1e6:.2f} MB sent per rank"
            )
    if args.checkpoint and rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.checkpoint)
        print(f"rank 0 saved model and optimizer to {args.checkpoint}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
