"""Does the preconditioner warm-up help grafted SINGD? AdamW vs grafted SINGD without and with
the warm-up, on the real-model language models, side by side in one process.

    python benchmarks/grafting_warmup.py [--workloads llama gpt2 mha-lm] [--steps 40]

Prints one Markdown row per (workload, lr): final training loss / evaluation loss, the mean
over the seeds.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from experiments.real_models import build_real_workload
from singd import SINGD


def run(name: str, make, steps: int, seed: int) -> tuple[float, float]:
    """Train a fresh workload ``name`` with optimizer ``make(model)``; final and eval loss."""
    w = build_real_workload(name, seed=seed)
    opt = make(w.model)
    loss = torch.tensor(float("nan"))
    for s in range(steps):
        opt.zero_grad()
        loss = w.loss(w.train[s % len(w.train)])
        loss.backward()
        opt.step()
    return float(loss), w.evaluate()


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["llama", "gpt2", "mha-lm"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 1e-2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("| workload | lr | AdamW | grafted, no warm-up | grafted, warm-up 20 |")
    print("|---|---:|---|---|---|")
    for name in args.workloads:
        for lr in args.lrs:
            makers = (
                lambda m: torch.optim.AdamW(m.parameters(), lr=lr),  # noqa: B023
                lambda m: SINGD(m, lr=lr, grafting="adam", warmup_steps=0),  # noqa: B023
                lambda m: SINGD(m, lr=lr, grafting="adam", warmup_steps=20),  # noqa: B023
            )
            cells = []
            for make in makers:
                runs = [run(name, make, args.steps, seed) for seed in args.seeds]
                train = sum(r[0] for r in runs) / len(runs)
                evaluation = sum(r[1] for r in runs) / len(runs)
                cells.append(f"{train:.3f} / {evaluation:.3f}")
            print(f"| {name} | {lr:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
