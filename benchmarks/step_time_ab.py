"""Before/after step time: SINGD of an earlier git revision and of the working tree in one process.

Sequential runs of ``step_time.py`` on a shared machine differ by up to 10 % per row, more
than most single changes; this loads the ``singd`` package of ``--before`` (``git archive``
into a temporary directory) beside the working tree's and times both, interleaved with
AdamW, on the models of ``step_time.py`` (batch 128, float32, 1 thread by default). Per
config: 7 rounds of 40 steps (T=10: 60); T=1 the median step, T=10 the mean step; the best
round; ratio to AdamW. Run with::

    .venv/bin/python benchmarks/step_time_ab.py --before 58df757
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES_T10 = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"]
STRUCTURES_T1 = STRUCTURES_T10[:1] + ["tril"] + STRUCTURES_T10[1:]


def load_singd(path: Path) -> type:
    """``singd.SINGD`` imported from the package under ``path`` (a fresh import)."""
    for name in [k for k in sys.modules if k == "singd" or k.startswith("singd.")]:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("singd").SINGD
    finally:
        sys.path.pop(0)


def archive(rev: str, into: Path) -> Path:
    """Extract the ``singd`` package of git revision ``rev`` into ``into``."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "singd"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def model(cnn: bool) -> nn.Module:
    """The MLP or CNN of ``step_time.py``, seeded."""
    torch.manual_seed(0)
    if cnn:
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(512, 10),
        )  # fmt: skip
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def compare(before: type, after: type, cnn: bool, structure: str, T: int, rounds: int) -> tuple:
    """(before / AdamW, after / AdamW) for one config."""
    x = torch.randn(128, 1, 8, 8) if cnn else torch.randn(128, 64)
    y = torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()
    runs = {}
    for name, make in (
        ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
        ("before", lambda m: before(m, structures=(structure,) * 2, T=T, lr=1e-3, lr_cov=1e-2)),
        ("after", lambda m: after(m, structures=(structure,) * 2, T=T, lr=1e-3, lr_cov=1e-2)),
    ):
        m = model(cnn)
        runs[name] = (m, make(m))
    best = {k: float("inf") for k in runs}
    steps = 40 if T == 1 else 60
    for _ in range(rounds):
        for name, (m, opt) in runs.items():
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                opt.zero_grad()
                loss_fn(m(x), y).backward()
                opt.step()
                times.append(time.perf_counter() - t)
            value = statistics.median(times[10:]) if T == 1 else statistics.fmean(times)
            best[name] = min(best[name], value)
    return best["before"] / best["adamw"], best["after"] / best["adamw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        before = load_singd(archive(args.before, Path(tmp)))
        after = load_singd(ROOT)
        configs = [(s, 1) for s in STRUCTURES_T1] + [(s, 10) for s in STRUCTURES_T10]
        rows = {c: [] for c in configs}
        for cnn in (False, True):
            for s, T in configs:
                rows[(s, T)] += compare(before, after, cnn, s, T, args.rounds)
    print(f"`step_time_ab.py --before {args.before}`, {args.threads} thread(s)\n")
    print("| config | MLP before | MLP after | CNN before | CNN after |")
    print("|---|---:|---:|---:|---:|")
    for (s, T), r in rows.items():
        print(f"| T={T} {s} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")


if __name__ == "__main__":
    main()
