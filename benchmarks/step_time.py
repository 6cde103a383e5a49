"""Median time of one SINGD training step as a ratio to AdamW, measured side by side.

One training step = zero_grad + forward + backward + step on a fixed batch of 128 (the issue's
workload; ``--batch`` changes it for checks), float32.
Models: MLP 64-128-128-10 (ReLU) and CNN Conv(1->16,3x3,pad 1) ReLU Conv(16->32,3x3,
stride 2,pad 1) ReLU Flatten Linear(512->10) on 1x8x8 inputs. All configurations of one
model and thread count run interleaved in rounds (round-robin blocks of steps), so the
ratios see the same machine load. T=1 rows report the median step; T=10 rows the mean over
all steps of a 10-step cycle (update and non-update steps together), computed as the mean
over the 10 phases of each phase's median so that load spikes do not dominate.

For dense configurations the achieved flop rate of the preconditioner work,
``sum_layers 4 (d_K^3 + d_C^3) + 4 N (d_K^2 + d_C^2)`` flops (N rows of a and g) per update
step divided by the extra time over AdamW, is reported as a fraction of the fp32 512x512
matmul rate measured in the same run with the same thread count.

Usage: ``python benchmarks/step_time.py --threads 1 2 [--steps 300] [--write RESULTS.md]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from results_md import write_section
from torch import nn

from singd import SINGD

CONFIGS: list[tuple[str, dict]] = [
    ("T=1 dense", dict(T=1, structures=("dense", "dense"))),
    ("T=1 tril", dict(T=1, structures=("tril", "tril"))),
    ("T=1 diagonal", dict(T=1, structures=("diagonal", "diagonal"))),
    ("T=1 block30diagonal", dict(T=1, structures=("block30diagonal", "block30diagonal"))),
    ("T=1 hierarchical15_15", dict(T=1, structures=("hierarchical15_15", "hierarchical15_15"))),
    ("T=1 triltoeplitz", dict(T=1, structures=("triltoeplitz", "triltoeplitz"))),
    ("T=10 dense", dict(T=10, structures=("dense", "dense"))),
    ("T=10 diagonal", dict(T=10, structures=("diagonal", "diagonal"))),
    ("T=10 block30diagonal", dict(T=10, structures=("block30diagonal", "block30diagonal"))),
    (
        "T=10 hierarchical15_15",
        dict(T=10, structures=("hierarchical15_15", "hierarchical15_15")),
    ),
    ("T=10 triltoeplitz", dict(T=10, structures=("triltoeplitz", "triltoeplitz"))),
]

#: Targets from issue #3 (ratio to AdamW, or to T=1 dense for tril): (MLP, CNN).
TARGETS: dict[str, tuple[float, float]] = {
    "T=1 dense": (3.0, 5.5),
    "T=1 diagonal": (1.4, 1.4),
    "T=1 block30diagonal": (2.0, 2.0),
    "T=1 hierarchical15_15": (2.0, 2.0),
    "T=1 triltoeplitz": (2.5, 2.5),
    "T=1 tril": (0.7, 0.7),
    "T=10 dense": (1.5, 1.6),
    "T=10 diagonal": (1.25, 1.3),
    "T=10 block30diagonal": (1.25, 1.3),
    "T=10 hierarchical15_15": (1.25, 1.3),
    "T=10 triltoeplitz": (1.25, 1.3),
}


def make_mlp() -> nn.Module:
    """MLP 64-128-128-10 with ReLU."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def make_cnn() -> nn.Module:
    """Conv(1->16,3,pad 1) ReLU Conv(16->32,3,stride 2,pad 1) ReLU Flatten Linear(512->10)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"MLP": make_mlp, "CNN": make_cnn}


def layer_flops(model: nn.Module, X: torch.Tensor) -> float:
    """``sum 4 (d_K^3 + d_C^3) + 4 N (d_K^2 + d_C^2)`` over the Linear/Conv2d layers."""
    total = 0.0
    rows: dict[nn.Module, int] = {}

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            rows[module] = out.shape[0] * out.shape[2] * out.shape[3]
        else:
            rows[module] = out[..., 0].numel()

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model(X)
    for h in handles:
        h.remove()
    for m, n in rows.items():
        dK = m.weight[0].numel() + (m.bias is not None)
        dC = m.weight.shape[0]
        total += 4 * (dK**3 + dC**3) + 4 * n * (dK**2 + dC**2)
    return total


def matmul_rate(repeats: int = 30) -> float:
    """fp32 512x512 matmul flop rate (flop/s), median over repeats."""
    A, B = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(5):
        A @ B
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        A @ B
        times.append(time.perf_counter() - t)
    return 2 * 512**3 / statistics.median(times)


def build(
    model_name: str, config: dict | None, singd: type = SINGD, batch: int = 128
) -> tuple[Callable[[], None], object]:
    """A closure running one training step, and its optimizer (AdamW for ``config=None``;
    ``singd``: the SINGD class to use, e.g. an earlier revision's in ``step_time_ab.py``)."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    X = torch.randn(batch, 1, 8, 8)
    y = torch.randint(0, 10, (batch,))
    if config is None:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = singd(model, lr=1e-3, lr_cov=1e-2, **config)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()

    return step, opt


def state_bytes(opt) -> int:
    """Total optimizer-state bytes (SINGD: state_bytes(); AdamW: its state tensors)."""
    if isinstance(opt, SINGD):
        return sum(sum(v.values()) for v in opt.state_bytes().values())
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )


def cycle_times(times: list[float], period: int = 10) -> dict[str, float]:
    """A T=10 cycle's step times, robust to load spikes, from the median of each phase (step
    index mod 10; blocks start at a multiple of 10, so phase 0 is the update step): the mean
    over all phases, the update step, and the mean of the other phases."""
    phases = [statistics.median(times[i::period]) for i in range(period)]
    return {
        "mean": statistics.fmean(phases),
        "update": phases[0],
        "other": statistics.fmean(phases[1:]),
    }


def measure(
    model_name: str, steps: int, rounds: int, warmup: int, batch: int = 128
) -> dict[str, dict]:
    """Per config: median and mean step time (s), state bytes; configs interleaved."""
    runs = {"AdamW": build(model_name, None, batch=batch)}
    for name, cfg in CONFIGS:
        runs[name] = build(model_name, cfg, batch=batch)
    for step, _ in runs.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {n: [] for n in runs}
    per_round = max(steps // rounds, 10)
    per_round += (-per_round) % 10  # whole T=10 cycles per block
    for _ in range(rounds):
        for name, (step, _) in runs.items():
            ts = times[name]
            for _ in range(per_round):
                t = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t)
    return {
        n: {
            "median": statistics.median(ts),
            **cycle_times(ts),
            "steps": len(ts),
            "bytes": state_bytes(runs[n][1]),
            # SINGD: whether statistics buffers survive the last step() (they must not)
            "pending": getattr(runs[n][1], "statistics_pending", lambda: False)(),
        }
        for n, ts in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per config")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved blocks")
    parser.add_argument("--warmup", type=int, default=30, help="rounded up to whole T=10 cycles")
    parser.add_argument("--batch", type=int, default=128, help="rows per step (issue: 128)")
    parser.add_argument("--write", help="replace the '## Optimizer step time' section here")
    args = parser.parse_args()
    args.warmup += (-args.warmup) % 10  # timed blocks start on an update step (phase 0)

    lines: list[str] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rate = matmul_rate()
        results = {m: measure(m, args.steps, args.rounds, args.warmup, args.batch) for m in MODELS}
        flops = {}
        for m in MODELS:
            torch.manual_seed(0)
            flops[m] = layer_flops(MODELS[m](), torch.randn(args.batch, 1, 8, 8))
        lines.append(
            f"**{threads} thread(s)**; fp32 512x512 matmul: {rate / 1e9:.1f} GFLOP/s; "
            f"AdamW step: MLP {results['MLP']['AdamW']['median'] * 1e3:.3f} ms, "
            f"CNN {results['CNN']['AdamW']['median'] * 1e3:.3f} ms (median)."
        )
        lines.append("")
        lines.append("| config | statistic | MLP ratio | target | CNN ratio | target |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for name, _ in CONFIGS:
            stat = "mean" if name.startswith("T=10") else "median"
            cells = []
            for i, m in enumerate(MODELS):
                r = results[m]
                if name == "T=1 tril":
                    ratio = r[name]["median"] / r["T=1 dense"]["median"]
                    unit = "x T=1 dense"
                else:
                    ratio = r[name][stat] / r["AdamW"][stat]
                    unit = "x AdamW"
                target = TARGETS[name][i]
                ok = "ok" if ratio <= target else "MISSED"
                cells += [f"{ratio:.2f}", f"<= {target} {unit} ({ok})"]
            lines.append(f"| {name} | {stat} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        lines.append("")
        lines.append("Dense preconditioner flop rate (flops per update / extra time over AdamW):")
        lines.append("")
        lines.append("| model | config | GFLOP per update | achieved GFLOP/s | of matmul rate |")
        lines.append("|---|---|---:|---:|---:|")
        for m in MODELS:
            r = results[m]
            for name in ("T=1 dense", "T=10 dense"):
                stat = "median" if name.startswith("T=1 ") else "mean"
                extra = r[name][stat] - r["AdamW"][stat]
                per_step = flops[m] / (1 if name.startswith("T=1 ") else 10)
                achieved = per_step / extra if extra > 0 else float("inf")
                lines.append(
                    f"| {m} | {name} | {flops[m] / 1e9:.4f} | {achieved / 1e9:.1f} | "
                    f"{achieved / rate:.0%} |"
                )
        lines.append("")
        lines.append(
            "T=10 cycle split: the update step (phase 0, median) and the mean of the other "
            "nine phases' medians, each as a ratio to AdamW's median step:"
        )
        lines.append("")
        lines.append(
            "| config | MLP update step | MLP other steps | CNN update step | CNN other steps |"
        )
        lines.append("|---|---:|---:|---:|---:|")
        for name, _ in CONFIGS:
            if name.startswith("T=10"):
                cells = [
                    f"{results[m][name][k] / results[m]['AdamW']['median']:.2f}"
                    for m in MODELS
                    for k in ("update", "other")
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if threads == args.threads[0]:
            lines.append("Optimizer-state bytes (T=1; T=10 adds the cached Gram matrices):")
            lines.append("")
            lines.append(
                "| optimizer | MLP bytes | CNN bytes | statistics buffers left after step() |"
            )
            lines.append("|---|---:|---:|---|")
            for name in ["AdamW", *(n for n, _ in CONFIGS)]:
                left = [m for m in MODELS if results[m][name]["pending"]]
                lines.append(
                    f"| {name} | {results['MLP'][name]['bytes']} | "
                    f"{results['CNN'][name]['bytes']} | {', '.join(left) or 'none'} |"
                )
            lines.append("")
    header = (
        f"Command: `python benchmarks/step_time.py --threads {' '.join(map(str, args.threads))} "
        f"--steps {args.steps} --rounds {args.rounds}"
        + (f" --batch {args.batch}" if args.batch != 128 else "")
        + f"` (torch {torch.__version__}, "
        f"{platform.machine()}, "
        f"{os.cpu_count()} cores shared, load average {os.getloadavg()[0]:.1f} at the end, "
        f"batch {args.batch}, float32, fixed batch; every config >= {args.steps} timed steps after "
        f"{args.warmup} warm-up steps, all configs of a model interleaved in {args.rounds} "
        "rounds). Ratios: SINGD step time / AdamW step time in the same run (T=1 tril: / T=1 "
        "dense). Reference `singd` 0.0.5 at 1 thread (from the issue): T=1 dense 4.2x (MLP) / "
        "5.8-7.9x (CNN), diagonal 2.2x, hierarchical 6.5x, triltoeplitz 42x, T=10 dense 2.0x."
    )
    text = "\n".join([header, "", *lines]).rstrip() + "\n"
    print(text)
    if args.write:
        write_section(args.write, "## Optimizer step time", text)


if __name__ == "__main__":
    main()
