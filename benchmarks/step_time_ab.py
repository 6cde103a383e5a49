"""Before/after step time: SINGD of an earlier git revision and of the working tree in one process.

Sequential runs of ``step_time.py`` on a shared machine differ by up to 10 % per row, more
than most single changes; this loads the ``singd`` package of ``--before`` (``git archive``
into a temporary directory) beside the working tree's and times both, interleaved with
AdamW, on the models and configs of ``step_time.py`` (batch 128, float32, 1 thread by
default). Per config: 20 warm-up steps, then 7 rounds of 40 steps (T=10: 60); T=1 the
median step, T=10 the mean step; the best round; ratio to AdamW. Run with::

    .venv/bin/python benchmarks/step_time_ab.py --before 58df757
    .venv/bin/python benchmarks/step_time_ab.py --before 58df757 --configs "T=1 diagonal"
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
from step_time import CONFIGS, MODELS, build

ROOT = Path(__file__).resolve().parents[1]


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


def compare(before: type, after: type, model: str, config: dict, rounds: int) -> tuple:
    """(before / AdamW, after / AdamW) for one model and config."""
    runs = {
        "adamw": build(model, None)[0],
        "before": build(model, config, singd=before)[0],
        "after": build(model, config, singd=after)[0],
    }
    for step in runs.values():  # warm-up (first hooks, caches, allocator)
        for _ in range(20):
            step()
    best = {k: float("inf") for k in runs}
    steps = 40 if config["T"] == 1 else 60
    for _ in range(rounds):
        for name, step in runs.items():
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            value = statistics.median(times[10:]) if config["T"] == 1 else statistics.fmean(times)
            best[name] = min(best[name], value)
    return best["before"] / best["adamw"], best["after"] / best["adamw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--configs",
        nargs="+",
        metavar="SUBSTRING",
        help="only the configs whose name contains one of these (e.g. 'T=1 diagonal')",
    )
    args = parser.parse_args()
    configs = [
        (name, c)
        for name, c in CONFIGS
        if not args.configs or any(sub in name for sub in args.configs)
    ]
    if not configs:
        names = ", ".join(name for name, _ in CONFIGS)
        parser.error(f"--configs matches no config; the configs are: {names}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        before = load_singd(archive(args.before, Path(tmp)))
        after = load_singd(ROOT)
        rows = {name: [] for name, _ in configs}
        for model in MODELS:
            for name, config in configs:
                rows[name] += compare(before, after, model, config, args.rounds)
    print(f"`step_time_ab.py --before {args.before}`, {args.threads} thread(s)\n")
    print("| config | " + " | ".join(f"{m} before | {m} after" for m in MODELS) + " |")
    print("|---|" + "---:|" * (2 * len(MODELS)))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r) + " |")


if __name__ == "__main__":
    main()
