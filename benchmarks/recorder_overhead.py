"""Recorder overhead: time per training step with and without a `Recorder`, side by side.

Workload: the digits MLP 64-128-128-10, batch 128, cross-entropy, on the CPU.
Configurations (each against the same training loop without any recorder):

- ``every10``: ``Recorder(every=10)`` with everything on (spectra, events, memory);
- ``every10-nospectra``: ``Recorder(every=10, spectra=False)`` (events and memory on);
- ``every10-nospectra-lossonly``: as above with ``check_finite="loss"``.

Method: ``--rounds`` rounds; in each round every configuration trains a fresh, identically
seeded model for ``--warmup`` + ``--steps`` steps on the same pre-built batches, in an
order rotated from round to round; the time of the ``--steps`` timed steps (wall clock,
including ``recorder.step``) is divided by their number. Overhead of a configuration is
the median over rounds of (its time per step / the no-recorder time per step of the
same round) - 1. Run with::

    .venv/bin/python benchmarks/recorder_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diagnostics.recorder import Recorder

CONFIGS: dict[str, dict | None] = {
    "none": None,
    "every10": {"every": 10},
    "every10-nospectra": {"every": 10, "spectra": False},
    "every10-nospectra-lossonly": {"every": 10, "spectra": False, "check_finite": "loss"},
}


def batches(batch_size: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` digits mini-batches (cycling through the training split)."""
    try:
        from diagnostics.workloads import BatchLoader, load_digits_data

        data = load_digits_data()
        x, y = data.x_train, data.y_train
        loader = BatchLoader(x, y, batch_size, shuffle=True, seed=0, drop_last=True)
    except ImportError:  # the workloads module is not there: build the data inline
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target)
        loader = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, 1280, 128)]
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < n:
        out.extend(loader)
    return out[:n]


def make_model() -> torch.nn.Module:
    """The 64-128-128-10 ReLU MLP, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (torch) or SINGD (dense K and C)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    from singd import SINGD

    return SINGD(model, lr=1e-3)


def run(opt_name: str, config: dict | None, data, warmup: int, steps: int) -> float:
    """Seconds per timed training step."""
    model = make_model()
    opt = make_optimizer(opt_name, model)
    rec = Recorder(opt, model, **config) if config is not None else None
    t0 = 0.0
    for i, (x, y) in enumerate(data[: warmup + steps]):
        if i == warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(loss=loss)
    dt = (time.perf_counter() - t0) / steps
    if rec is not None:
        rec.close()
    return dt


def main() -> None:
    """Measure and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "singd"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(128, args.warmup + args.steps)
    print(f"torch {torch.__version__}, threads {args.threads}, rounds {args.rounds}, "
          f"{args.steps} timed steps (+{args.warmup} warm-up) per run")  # fmt: skip
    print("| optimizer | recorder | ms / step (median) | overhead (median of paired ratios) |")
    print("|---|---|---|---|")
    for opt_name in args.optimizers:
        try:
            make_optimizer(opt_name, make_model())
        except Exception as err:  # SINGD may not be importable yet
            print(f"| {opt_name} | skipped: {type(err).__name__}: {err} | | |")
            continue
        names = list(CONFIGS)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                times[n].append(run(opt_name, CONFIGS[n], data, args.warmup, args.steps))
        base = times["none"]
        for n in names:
            ratios = [t / b - 1.0 for t, b in zip(times[n], base)]
            ms = 1e3 * statistics.median(times[n])
            ov = "-" if n == "none" else f"{100 * statistics.median(ratios):+.1f} %"
            print(f"| {opt_name} | {n} | {ms:.3f} | {ov} |")


if __name__ == "__main__":
    main()
