"""Recorder overhead: time per training step with and without a `Recorder`, side by side.

Workload: the digits MLP 64-128-128-10, batch 128, cross-entropy, on the CPU.
Configurations (each against the same training loop without any recorder):

- ``every10``: ``Recorder(every=10)``, the defaults: spectra, events (``check_finite="loss"``
  on unrecorded steps), memory, ``workers="auto"`` (a spectra thread when a CPU is free:
  the script prints what it resolved to; its CPU time is not the training thread's, so
  read the wall columns for this row);
- ``every10-inline``: as ``every10`` with ``workers=0`` (spectra on the training thread);
- ``every10-nospectra``: ``spectra=False`` (events and memory on);
- ``every10-nospectra-grads``: as above with ``check_finite="grads"``;
- ``every10-events-only``: ``spectra=False, memory=False`` (norms and events only);
- ``every4-nospectra``: ``every=4, spectra=False`` (Cockpit's cheapest preset, about 1.2x at
  interval 4, for comparison; the blocks of 10 steps then hold 2 or 3 recorded steps);
- ``every4``: ``every=4``, the defaults (``workers="auto"``);
- ``every4-inline``: ``every=4, workers=0`` (full spectra on the training thread).

``--workload llama`` (default; the targets): a 2-layer HF Llama, hidden 128, fp32, batches
of 8 x 64 random tokens, SINGD dense with T=10, in the configurations ``every10``
(defaults: ``budget=0.05``), ``every10-nospectra``, ``every10-exact`` (``budget=None``:
exact spectra of every factor, for teaching) and ``every10-nostepnorms`` (what the
per-step total norms cost). Targets: <= +5 % step time with defaults, <= +2 % with spectra
off. ``--workload digits-mlp``: the MLP below (reported, not targeted).

With ``--previous REV`` the recorder of git revision REV (its ``diagnostics`` package from
``git archive`` in a temporary directory) trains alongside in the same interleaved run,
in the configurations named ``prev-...``.

Method: every configuration trains its own identically seeded model on the same batches,
and all of them advance *together*, one block of 10 steps each (one recording period,
the recorded step in its middle, after five steps of the same model as in training), in
an order rotated every block, so that load from other
processes on a shared machine hits them alike; after its block, a recorder's pending
spectra are waited for outside the timed steps, so that a worker thread overlaps only
its own configuration's steps (the script prints how often it was still busy then).
Each step is timed (``zero_grad`` to ``recorder.step`` inclusive) by the CPU time of the
training thread (``time.thread_time``, default: on a shared machine it is far less
disturbed by other processes than the wall clock, and with one torch thread and
``workers=0`` all work of a step runs on that thread) and by the wall clock, both
reported. Every block holds exactly one recorded step (every=4: two or three); the
overhead of a configuration is the median over blocks of (its block time / the
no-recorder block time) - 1, with the quartiles, and also the ratio of the mean times.
With a worker thread, read the wall columns: its CPU time is not the training thread's.
``--interleave step`` takes turns step by step instead (the method used before): every
step then starts with cold caches (a slower baseline, smaller ratios), and a worker
thread runs during the other configurations' steps too.
Run with::

    .venv/bin/python benchmarks/recorder_overhead.py --threads 1 --blocks 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from diagnostics.record.recorder import Recorder

CONFIGS: dict[str, dict | None] = {
    "none": None,
    "every10": {"every": 10},
    "every10-nospectra": {"every": 10, "spectra": False},
    "every10-nospectra-grads": {"every": 10, "spectra": False, "check_finite": "grads"},
    "every10-events-only": {"every": 10, "spectra": False, "memory": False},
    "every10-inline": {"every": 10, "workers": 0},
    "every4-nospectra": {"every": 4, "spectra": False},
    "every4": {"every": 4},
    "every4-inline": {"every": 4, "workers": 0},
}
#: On the Llama: defaults (budget 0.05), spectra off, exact everything (budget=None).
LLAMA_CONFIGS: dict[str, dict | None] = {
    "none": None,
    "every10": {"every": 10},
    "every10-nospectra": {"every": 10, "spectra": False},
    "every10-exact": {"every": 10, "budget": None},
    "every10-nostepnorms": {"every": 10, "step_norms": False},
}
LLAMA_PREVIOUS: dict[str, dict] = {"prev-every10": {"every": 10}}
PREVIOUS: dict[str, dict] = {
    "prev-every10-inline": {"every": 10, "workers": 0},
    "prev-every10-nospectra": {"every": 10, "spectra": False},
    "prev-every10-events-only": {"every": 10, "spectra": False, "memory": False},
    "prev-every10-worker": {"every": 10, "workers": 1},
}


def load_previous(rev: str) -> type:
    """The `Recorder` class of git revision ``rev``: that revision's ``diagnostics`` package
    (``git archive`` into a temporary directory), imported under its own name while this
    one is set aside, then this one restored (the old classes keep their own modules)."""
    import importlib
    import io
    import subprocess
    import sys
    import tarfile
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="recorder_prev_"))
    tar = subprocess.run(
        ["git", "archive", rev, "diagnostics"], cwd=root, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(tmp, filter="data")
    ours = {
        k: v for k, v in sys.modules.items() if k == "diagnostics" or k.startswith("diagnostics.")
    }
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, str(tmp))
    try:
        try:
            module = importlib.import_module("diagnostics.record.recorder")
        except ModuleNotFoundError:  # before the move into diagnostics/record/
            module = importlib.import_module("diagnostics.recorder")
        return module.Recorder
    finally:
        sys.path.remove(str(tmp))
        for k in [k for k in sys.modules if k == "diagnostics" or k.startswith("diagnostics.")]:
            del sys.modules[k]
        sys.modules.update(ours)


def batches(batch_size: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` digits mini-batches (cycling through the training split)."""
    try:
        from experiments.workloads import BatchLoader, load_digits_data

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


#: The workload: "digits-mlp" (reported, not targeted) or "llama" (the target).
WORKLOAD = {"name": "digits-mlp"}
#: SINGD's T per workload (the Llama as measured by users: T=10).
SINGD_T = {"digits-mlp": 1, "llama": 10}
LLAMA = {"hidden": 128, "layers": 2, "batch": 8, "length": 64}


def make_llama() -> torch.nn.Module:
    """A 2-layer HF Llama (hidden 128, vocab 64), random init, seeded, fp32."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="SINGD preconditions")
    torch.manual_seed(0)
    h = LLAMA["hidden"]
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=LLAMA["layers"],
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def llama_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded batches of random token ids (their own targets)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, LLAMA["batch"], LLAMA["length"]), generator=g)
    return [(b, b) for b in ids]


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (torch) or SINGD (dense K and C)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    from singd import SINGD

    return SINGD(model, lr=1e-3, T=SINGD_T[WORKLOAD["name"]])


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The workload's training loss."""
    if WORKLOAD["name"] == "llama":
        return model(input_ids=x, labels=y).loss
    return F.cross_entropy(model(x), y)


class Trainer:
    """One model + optimizer (+ recorder) that can be advanced one timed step at a time."""

    def __init__(self, opt_name: str, config: dict | None, recorder: type = Recorder) -> None:
        self.model = make_llama() if WORKLOAD["name"] == "llama" else make_model()
        self.opt = make_optimizer(opt_name, self.model)
        self.rec = recorder(self.opt, self.model, **config) if config is not None else None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One training step (plus ``recorder.step``): (wall seconds, thread CPU seconds)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of(self.model, x, y)
        loss.backward()
        self.opt.step()
        if self.rec is not None:
            self.rec.step(loss=loss)
        return time.perf_counter() - t0, time.thread_time() - c0


def _wait(rec) -> int:
    """Let a recorder's worker finish (outside the timed steps); how many jobs still ran."""
    if hasattr(rec, "flush"):
        return rec.flush()
    running = sum(not f.done() for f in rec._pending)  # a previous revision without flush()
    rec._drain(wait=True)
    return running


def measure(
    opt_name: str,
    data,
    warmup: int,
    blocks: int,
    period: int,
    previous: type | None = None,
    interleave: str = "block",
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Per configuration, the (wall, CPU) time of each block of ``period`` steps, and how
    many blocks ended with the recorder's worker still busy.

    Each block holds exactly one recorded step, in its middle (blocks start half a period
    in, so that the recorded step follows steps of the same model, as in training, not
    another configuration's). The configurations take turns block by block, in an order
    rotated every block, so that load from other processes hits all of them alike; a
    configuration's ``period`` steps run back to back, so that its worker thread (if
    any) overlaps its own steps only: after its block, the
    recorder's pending spectra are waited for outside the timed steps (counted: a job
    still running then means the worker did not keep up). CPU time is that of the
    training thread (``time.thread_time``). ``interleave="step"``: the configurations
    take turns step by step instead (cold caches at every step, and a worker thread then
    also runs during the other configurations' steps, the baseline's included).
    """
    trainers = {n: Trainer(opt_name, c) for n, c in CONFIGS.items()}
    if previous is not None:
        trainers.update({n: Trainer(opt_name, c, previous) for n, c in PREVIOUS.items()})
    names = list(trainers)
    out: tuple[dict[str, list[float]], ...] = ({n: [] for n in names}, {n: [] for n in names})
    late = dict.fromkeys(names, 0)
    if interleave == "step":  # one step each in turn (the method before 2026-11-25)
        acc = {n: [0.0, 0.0] for n in names}
        for i in range(warmup + blocks * period):
            x, y = data[i % len(data)]
            k = i % len(names)
            for n in names[k:] + names[:k]:
                w, c = trainers[n].step(x, y)
                if i >= warmup:
                    acc[n][0] += w
                    acc[n][1] += c
            if i >= warmup and (i - warmup + 1) % period == 0:
                for n in names:
                    out[0][n].append(acc[n][0])
                    out[1][n].append(acc[n][1])
                    acc[n] = [0.0, 0.0]
        for t in trainers.values():
            if t.rec is not None:
                t.rec.close()
        return out[0], out[1], late
    warm_blocks = -(-warmup // period)
    shift = period // 2  # blocks start mid-period: the recorded step follows a warm step
    for t in trainers.values():
        for j in range(shift):
            t.step(*data[j % len(data)])
    for b in range(warm_blocks + blocks):
        k = b % len(names)
        for n in names[k:] + names[:k]:
            t = trainers[n]
            wall = cpu = 0.0
            for j in range(period):
                x, y = data[(shift + b * period + j) % len(data)]
                w, c = t.step(x, y)
                wall += w
                cpu += c
            busy = _wait(t.rec) if t.rec is not None else 0
            if b >= warm_blocks:
                out[0][n].append(wall)
                out[1][n].append(cpu)
                late[n] += busy > 0
    for t in trainers.values():
        if t.rec is not None:
            t.rec.close()
    return out[0], out[1], late


def _overhead(ts: list[float], base: list[float]) -> tuple[str, str]:
    """Median of block ratios with quartiles, and the ratio of means, as percent strings."""
    ratios = sorted(t / b - 1.0 for t, b in zip(ts, base))
    q1, med, q3 = (ratios[int(q * (len(ratios) - 1))] for q in (0.25, 0.5, 0.75))
    mean_ratio = statistics.fmean(ts) / statistics.fmean(base) - 1.0
    return (
        f"{100 * med:+.1f} % [{100 * q1:+.1f}, {100 * q3:+.1f}]",
        f"{100 * mean_ratio:+.1f} %",
    )


def main() -> None:
    """Measure and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=100, help="blocks of 10 steps measured")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "singd"])
    ap.add_argument("--previous", default=None, help="git revision of a recorder to compare")
    ap.add_argument(
        "--workload",
        choices=["llama", "digits-mlp"],
        default="llama",
        help="llama: HF Llama hidden 128, 2 layers, fp32, SINGD T=10 (the targets: <= +5 %% "
        "with defaults, <= +2 %% with spectra off); digits-mlp: reported, not targeted",
    )
    ap.add_argument(
        "--interleave",
        choices=["block", "step"],
        default="block",
        help="take turns by blocks of 10 steps (default) or by single steps (older method)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    previous = load_previous(args.previous) if args.previous else None
    period = 10
    WORKLOAD["name"] = args.workload
    if args.workload == "llama":
        global CONFIGS, PREVIOUS
        CONFIGS, PREVIOUS = LLAMA_CONFIGS, LLAMA_PREVIOUS
        data = llama_batches(20)
    else:
        data = batches(128, 200)
    from diagnostics.record.recorder import auto_workers

    print(
        f"torch {torch.__version__}, {args.threads} torch thread(s), "
        f"{args.blocks} blocks x {period} steps (+{args.warmup} warm-up), interleaved by "
        f"{args.interleave}; "
        f'workers="auto" resolves to {auto_workers()} here; load average before: '
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print("| optimizer | recorder | CPU ms / step (mean) | CPU overhead: median of block ratios "
          "[25%, 75%] | CPU: ratio of means | wall ms / step | wall overhead: median "
          "[25%, 75%] | wall: ratio of means |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for opt_name in args.optimizers:
        try:
            make_optimizer(opt_name, torch.nn.Linear(2, 2))
        except Exception as err:  # SINGD may not be importable
            print(f"| {opt_name} | skipped: {type(err).__name__}: {err} | | | | | | |")
            continue
        wall, cpu, late = measure(
            opt_name, data, args.warmup, args.blocks, period, previous, args.interleave
        )
        for n in cpu:
            cells = []
            for times in (cpu, wall):
                ms = 1e3 * statistics.fmean(times[n]) / period
                if n == "none":
                    cells += [f"{ms:.3f}", "-", "-"]
                else:
                    cells += [f"{ms:.3f}", *_overhead(times[n], times["none"])]
            print(f"| {opt_name} | {n} | " + " | ".join(cells) + " |")
        if args.interleave == "block":
            busy = {n: v for n, v in late.items() if v}
            print(f"({opt_name}: blocks that ended with the worker still busy: {busy or 'none'})")

    print("load average after: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
