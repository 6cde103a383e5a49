"""Real-model study: AdamW, SINGD (Adam-grafted per structure, reference-compatible, defaults)
and KFAC on the real-model workloads (Llama, GPT-2, an nn.MultiheadAttention LM, ViT, ResNet).

Parts (one process, one torch thread; every number comes from this run):

1. *main table*: per (workload, precision, optimizer) the learning rate is chosen on the
   validation loss (``RealWorkload.evaluate()``; a run with a non-finite loss or an optimizer
   error ranks last) from one grid shared by every optimizer, with seed 0 and the same step
   budget; seeds 1..S-1 then train at that lr. Reported: final training loss (mean loss of the
   last pass over the fixed training batches), validation loss, test accuracy (vision; digits
   test split), NaN events (steps with a non-finite loss), optimizer state bytes, median step
   time and its ratio to AdamW's in the same run, guard activations.
2. *robustness grid* per LM: lr x lr_cov x T x damping (36 runs), SINGD defaults with
   grafting next to the reference-compatible setting (ungrafted, ``guard=None``,
   ``fallback="none"``): non-finite runs and guard activations.
3. *grafting overhead*: step time of SINGD with ``grafting="adam"`` over SINGD without it,
   per structure, interleaved blocks of steps on the same machine state.
4. *preconditioner warm-up* on llama (grafted, AdamW's chosen lr): T=1 and a larger lr_cov
   for the first 20 steps vs the defaults, over seeds.

Precisions: fp32, bf16-autocast (fp32 model, bf16 forward), bf16-pure (model and optimizer
state in bf16) and bf16-pure+comp (bf16-pure with ``compensated=True``; SINGD and KFAC only,
torch's AdamW has no such option).

Usage::

    python benchmarks/real_models.py --quick   # about 7 min on one thread (see --help)
    python benchmarks/real_models.py           # full mode: about 3 h on one thread
    python benchmarks/real_models.py --workloads llama --steps 3 --lrs 0.01 --no-write

Writes ``benchmarks/real_models.json`` and the section "Real models" of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results_md import write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SECTION = "## Real models"
WORKLOADS = ("llama", "gpt2", "mha-lm", "vit", "resnet")
LMS = ("llama", "gpt2", "mha-lm")
VISION = ("vit", "resnet")
PRECISIONS = ("fp32", "bf16-autocast", "bf16-pure", "bf16-pure+comp")
STRUCTURES = ("diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "dense")
FULL_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_LRS = (3e-3, 1e-2, 3e-2)
KFAC_FIXED = {"damping": 0.1, "T": 10}  # damping 1e-3 (the default) fails Cholesky on llama
#: Robustness grid axes (36 points).
GRID = {
    "lr": (1e-3, 1e-2, 1e-1),
    "lr_cov": (1e-2, 1e-1, 0.5),
    "T": (1, 10),
    "damping": (1e-4, 1e-2),
}
WARMUP_STEPS = 20


@dataclass(frozen=True)
class Variant:
    """One optimizer configuration: a label, a kind ("adamw", "singd", "kfac") and options."""

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


def _grafted(structure: str) -> Variant:
    return Variant(
        f"SINGD+graft {structure}", "singd", {"grafting": "adam", "structures": (structure,) * 2}
    )


VARIANTS: dict[str, Variant] = {
    "adamw": Variant("AdamW", "adamw"),
    **{s: _grafted(s) for s in STRUCTURES},
    "reference": Variant("SINGD reference", "singd", {"guard": None, "fallback": "none"}),
    "defaults": Variant("SINGD defaults", "singd"),
    "kfac": Variant("KFAC", "kfac", dict(KFAC_FIXED)),
}
GRAFTED = tuple(VARIANTS[s].label for s in STRUCTURES)
ORDER = [v.label for v in VARIANTS.values()]


def applies(variant: str, precision: str) -> bool:
    """Whether ``variant`` runs in ``precision`` (AdamW has no compensated bf16)."""
    return not (variant == "adamw" and precision == "bf16-pure+comp")


# ---------------------------------------------------------------------- one run
def make_optimizer(
    variant: str, model: torch.nn.Module, lr: float, precision: str, **overrides: Any
) -> torch.optim.Optimizer:
    """The optimizer of ``variant`` for ``model`` (``overrides`` replace its options)."""
    from singd import KFAC, SINGD

    v = VARIANTS[variant]
    opts = {**v.options, **overrides}
    if v.kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, **opts)
    if precision == "bf16-pure+comp":
        opts["compensated"] = True
    cls = SINGD if v.kind == "singd" else KFAC
    return cls(model, lr=lr, warn_unsupported=False, **opts)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer state bytes: ``state_bytes()`` summed, or AdamW's state tensors."""
    if hasattr(opt, "state_bytes"):
        return sum(sum(c.values()) for c in opt.state_bytes().values())
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )


def _inputs(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Inputs in the model's dtype (bf16-pure casts images; token ids stay integer)."""
    return x.bfloat16() if precision.startswith("bf16-pure") and x.is_floating_point() else x


def train_steps(
    w: Any,
    opt: torch.optim.Optimizer,
    precision: str,
    steps: int,
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Train ``steps`` steps cycling over ``w.train``; returns losses and step times (s)."""
    losses, times = [], []
    autocast = precision == "bf16-autocast"
    for i in range(steps):
        if before_step is not None:
            before_step(i, opt)
        x, y = w.train[i % len(w.train)]
        x = _inputs(x, precision)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = w.loss_fn(w.model, x, y)
        loss.float().backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, times


@torch.no_grad()
def evaluate(w: Any, precision: str) -> tuple[float, float | None]:
    """Validation loss (``w.evaluate()`` semantics) and, for vision, test accuracy (%)."""
    from experiments.real_models import digit_batches

    w.model.eval()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            val = [float(w.loss_fn(w.model, _inputs(x, precision), y)) for x, y in w.eval]
            acc = None
            if w.name in VISION:
                hits = n = 0
                for x, y in digit_batches("test", 256):
                    logits = w.model(pixel_values=_inputs(x, precision)).logits
                    hits += int((logits.argmax(-1) == y).sum())
                    n += len(y)
                acc = 100.0 * hits / n
    finally:
        w.model.train()
    return sum(val) / len(val), acc


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (workload, precision, variant, lr, seed) and return a flat result row."""
    from experiments.real_models import build_real_workload

    torch.manual_seed(task["seed"])
    w = build_real_workload(task["workload"], seed=task["seed"])
    if task["precision"].startswith("bf16-pure"):
        w.model.to(torch.bfloat16)
    row = {k: task[k] for k in ("workload", "precision", "variant", "lr", "seed", "phase")}
    row["variant"] = VARIANTS[task["variant"]].label
    opt = make_optimizer(
        task["variant"], w.model, task["lr"], task["precision"], **task.get("overrides", {})
    )
    error = None
    try:
        losses, times = train_steps(
            w, opt, task["precision"], task["steps"], task.get("before_step")
        )
    except Exception as err:  # an optimizer error (KFAC inverse) ends the run; it is reported
        error, losses, times = f"{type(err).__name__}: {err}"[:300], [math.nan], [math.nan]
    val, acc = evaluate(w, task["precision"])
    tail = losses[-len(w.train) :]
    row.update(
        initial_loss=losses[0],
        final_train_loss=sum(tail) / len(tail),
        val_loss=val,
        test_accuracy=acc,
        nan_events=sum(not math.isfinite(x) for x in losses),
        error=error,
        state_bytes=state_bytes(opt),
        step_s=statistics.median(times[2:] or times),
        guard=len(opt.guard_activations()) if hasattr(opt, "guard_activations") else 0,
        steps=len(losses),
    )
    return row


def run_all(tasks: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Run tasks one after another in this process, printing progress to stderr."""
    rows = []
    t0 = time.time()
    for i, t in enumerate(tasks):
        rows.append(run_one(t))
        if (i + 1) % 10 == 0 or i + 1 == len(tasks):
            print(f"{label}: {i + 1}/{len(tasks)} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------- selection
def _clean(row: dict[str, Any]) -> bool:
    return row["nan_events"] == 0 and not row["error"] and math.isfinite(row["val_loss"])


def choose_lr(rows: Sequence[dict[str, Any]]) -> float:
    """The lr of the best tuning run: clean runs first, then the lowest validation loss."""
    return min(rows, key=lambda r: (not _clean(r), r["val_loss"] if _clean(r) else 0, r["lr"]))[
        "lr"
    ]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (workload, precision, variant) from tuning and seed rows."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        cells[(r["workload"], r["precision"], r["variant"])].append(r)
    out = []
    for (w, p, v), rs in cells.items():
        lr = choose_lr([r for r in rs if r["phase"] == "tune"])
        runs = sorted(
            [r for r in rs if r["lr"] == lr and r["phase"] in ("tune", "seed")],
            key=lambda r: r["seed"],
        )
        train, train_std = _mean_std([r["final_train_loss"] for r in runs])
        accs = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
        out.append(
            {
                "workload": w,
                "precision": p,
                "variant": v,
                "lr": lr,
                "seeds": len(runs),
                "train_loss": train,
                "train_std": train_std,
                "val_loss": statistics.fmean(r["val_loss"] for r in runs),
                "test_acc": _mean_std(accs)[0] if accs else None,
                "test_std": _mean_std(accs)[1] if accs else None,
                "nan_events": sum(r["nan_events"] for r in runs),
                "errors": sum(bool(r["error"]) for r in runs),
                "state_bytes": max(r["state_bytes"] for r in runs),
                "step_ms": 1e3 * statistics.median(r["step_s"] for r in runs),
                "guard": sum(r["guard"] for r in runs),
                "tuning": {
                    str(r["lr"]): round(r["val_loss"], 4) for r in rs if r["phase"] == "tune"
                },
            }
        )
    _add_time_ratios(out)
    out.sort(key=lambda r: (WORKLOADS.index(r["workload"]), PRECISIONS.index(r["precision"]),
                            ORDER.index(r["variant"])))  # fmt: skip
    return out


def _add_time_ratios(summary: list[dict[str, Any]]) -> None:
    """``time_ratio``: step time over AdamW's in the same workload and precision (AdamW
    bf16-pure for bf16-pure+comp)."""
    adam = {
        (r["workload"], r["precision"]): r["step_ms"] for r in summary if r["variant"] == "AdamW"
    }
    for r in summary:
        p = "bf16-pure" if r["precision"] == "bf16-pure+comp" else r["precision"]
        base = adam.get((r["workload"], p))
        r["time_ratio"] = r["step_ms"] / base if base else None


# ---------------------------------------------------------------------- robustness grid
def grid_tasks(workload: str, steps: int) -> list[dict[str, Any]]:
    """36 grid points x {defaults+grafting, reference-compatible} for one workload (fp32)."""
    tasks = []
    for lr, lr_cov, T, damping in itertools.product(*GRID.values()):
        for variant, extra in (("defaults", {"grafting": "adam"}), ("reference", {})):
            tasks.append(
                {
                    "workload": workload,
                    "precision": "fp32",
                    "variant": variant,
                    "lr": lr,
                    "seed": 0,
                    "phase": "grid",
                    "steps": steps,
                    "overrides": {"lr_cov": lr_cov, "T": T, "damping": damping, **extra},
                }
            )
    return tasks


def grid_rows(workload: str, steps: int, points: int = 36) -> list[dict[str, Any]]:
    """The robustness grid's rows (the first ``points`` points), each with its grid point
    and setting."""
    tasks = grid_tasks(workload, steps)[: 2 * points]
    rows = run_all(tasks, f"grid {workload}")
    for t, r in zip(tasks, rows):
        r.update({k: t["overrides"][k] for k in ("lr_cov", "T", "damping")})
        r["setting"] = "defaults+grafting" if t["variant"] == "defaults" else "reference"
    return rows


def grid_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, setting): runs, non-finite runs, diverged runs, guard activations."""
    out = []
    keys = sorted({(r["workload"], r["setting"]) for r in rows}, key=lambda k: (
        WORKLOADS.index(k[0]), k[1] != "defaults+grafting"))  # fmt: skip
    for w, s in keys:
        rs = [r for r in rows if r["workload"] == w and r["setting"] == s]
        bad = [r for r in rs if not _clean(r)]
        out.append(
            {
                "workload": w,
                "setting": s,
                "runs": len(rs),
                "non_finite": len(bad),
                "errors": sum(bool(r["error"]) for r in rs),
                "diverged": sum(
                    _clean(r) and r["final_train_loss"] > r["initial_loss"] for r in rs
                ),
                "guard": sum(r["guard"] for r in rs),
                "guard_runs": sum(r["guard"] > 0 for r in rs),
                "bad_points": [
                    f"lr={r['lr']:g} lr_cov={r['lr_cov']:g} T={r['T']} damping={r['damping']:g}"
                    for r in bad
                ],
            }
        )
    return out


# ---------------------------------------------------------------------- grafting overhead
def timing_ab(workload: str, structure: str, blocks: int, block_steps: int) -> dict[str, Any]:
    """Median step time of SINGD with Adam grafting over SINGD without (same structure and
    defaults), interleaved blocks of ``block_steps`` steps, fp32."""
    from experiments.real_models import build_real_workload
    from singd import SINGD

    pairs = []
    for graft in ("adam", None):
        w = build_real_workload(workload, seed=0)
        opt = SINGD(w.model, lr=1e-3, structures=(structure,) * 2, grafting=graft,
                    warn_unsupported=False)  # fmt: skip
        train_steps(w, opt, "fp32", 5)  # warm-up, also past the first preconditioner update
        pairs.append((w, opt, []))
    for _ in range(blocks):
        for w, opt, times in pairs:
            times += train_steps(w, opt, "fp32", block_steps)[1]
    g, u = (statistics.median(p[2]) for p in pairs)
    return {"workload": workload, "structure": structure, "grafted_ms": 1e3 * g,
            "ungrafted_ms": 1e3 * u, "ratio": g / u}  # fmt: skip


# ---------------------------------------------------------------------- warm-up
def _warmup_schedule(i: int, opt: torch.optim.Optimizer) -> None:
    """After the warm-up, T goes back to the default 10."""
    if i == WARMUP_STEPS:
        for g in opt.param_groups:
            g["T"] = 10


def _warm_lr_cov(step: int) -> float:
    return 0.1 if step < WARMUP_STEPS else 1e-2


WARMUPS: dict[str, tuple[dict[str, Any], Any]] = {
    "defaults (T=10, lr_cov=1e-2)": ({}, None),
    f"T=1 for {WARMUP_STEPS} steps": ({"T": 1}, _warmup_schedule),
    f"T=1, lr_cov=0.1 for {WARMUP_STEPS} steps": (
        {"T": 1, "lr_cov": _warm_lr_cov},
        _warmup_schedule,
    ),
}


def warmup_rows(lr: float, seeds: int, steps: int, workload: str = "llama") -> list[dict]:
    """SINGD defaults with grafting at ``lr``, with and without a preconditioner warm-up."""
    tasks, names = [], []
    for name, (extra, schedule) in WARMUPS.items():
        for seed in range(seeds):
            tasks.append(
                {
                    "workload": workload,
                    "precision": "fp32",
                    "variant": "defaults",
                    "lr": lr,
                    "seed": seed,
                    "phase": "warmup",
                    "steps": steps,
                    "overrides": {"grafting": "adam", **extra},
                    "before_step": schedule,
                }
            )
            names.append(name)
    rows = run_all(tasks, "warm-up")
    for name, r in zip(names, rows):
        r["schedule"] = name
    return rows


# ---------------------------------------------------------------------- targets
def _adam_cell(summary: list[dict], w: str, p: str) -> dict | None:
    p = "bf16-pure" if p == "bf16-pure+comp" else p
    return next((r for r in summary if r["workload"] == w and r["precision"] == p
                 and r["variant"] == "AdamW"), None)  # fmt: skip


def quality_check(summary: list[dict[str, Any]]) -> tuple[list[str], int, int]:
    """Lines per (workload, precision): grafted SINGD vs AdamW (LM: final train loss <=
    AdamW's; vision: test accuracy >= AdamW's - 0.5 pp; no NaN/error); met and total cells."""
    lines, met, total = [], 0, 0
    for w in WORKLOADS:
        for p in PRECISIONS:
            adam, vs = _adam_cell(summary, w, p), ""
            if adam is None and p == "bf16-pure+comp":  # AdamW bf16-pure not run (--quick)
                adam, vs = _adam_cell(summary, w, "fp32"), " fp32"
            cells = [r for r in summary if r["workload"] == w and r["precision"] == p
                     and r["variant"] in GRAFTED]  # fmt: skip
            if adam is None or not cells:
                continue
            parts = []
            for r in cells:
                if w in VISION:
                    gap = r["test_acc"] - adam["test_acc"]
                    ok, txt = gap >= -0.5, f"{gap:+.1f} pp"
                else:
                    gap = r["train_loss"] - adam["train_loss"]
                    ok, txt = gap <= 0, f"{gap:+.3f}"
                ok = ok and r["nan_events"] == 0 and r["errors"] == 0
                met, total = met + ok, total + 1
                parts.append(
                    f"{r['variant'].removeprefix('SINGD+graft ')} {txt}{'' if ok else ' MISS'}"
                )
            ref = f"{adam['test_acc']:.1f}%" if w in VISION else f"{adam['train_loss']:.3f}"
            ref = f"AdamW{vs} {ref}"
            lines.append(f"- {w}, {p} ({ref}): " + "; ".join(parts))
    return lines, met, total


def halfway_ratios(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> list[dict]:
    """Issue 16: per LM (fp32, seed 0), how far SINGD defaults' loss falls at AdamW's chosen
    lr, as a fraction of how far AdamW's falls (target >= 0.5)."""
    out = []
    for w in LMS:
        adam = _adam_cell(summary, w, "fp32")
        if adam is None:
            continue
        at = {r["variant"]: r for r in rows if r["workload"] == w and r["precision"] == "fp32"
              and r["phase"] == "tune" and r["seed"] == 0 and r["lr"] == adam["lr"]}  # fmt: skip
        a, d = at.get("AdamW"), at.get("SINGD defaults")
        if a is None or d is None:
            continue
        fall_a = a["initial_loss"] - a["final_train_loss"]
        fall_d = d["initial_loss"] - d["final_train_loss"]
        out.append(
            {
                "workload": w,
                "lr": adam["lr"],
                "adamw_fall": fall_a,
                "defaults_fall": fall_d,
                "ratio": fall_d / fall_a if fall_a > 0 else math.nan,
            }
        )
    return out


# ---------------------------------------------------------------------- report
def _kib(b: float) -> str:
    return f"{b / 1024:.0f} KiB" if b < 1024**2 else f"{b / 1024**2:.2f} MiB"


def _short(label: str) -> str:
    return label.removeprefix("SINGD+graft ").replace("SINGD ", "").replace("hierarchical", "hier")


def loss_table(summary: list[dict[str, Any]], steps: int) -> list[str]:
    """Issue 16's table: final training loss (vision: and test accuracy) per optimizer."""
    labels = [v for v in ORDER if any(r["variant"] == v for r in summary)]
    heads = [("graft " if v in GRAFTED else "") + _short(v) for v in labels]
    out = [f"| workload | precision | {' | '.join(heads)} |", "|---|---|" + "---|" * len(labels)]
    for w in WORKLOADS:
        for p in PRECISIONS:
            cell = {r["variant"]: r for r in summary if r["workload"] == w and r["precision"] == p}
            if not cell:
                continue
            vals = []
            for v in labels:
                r = cell.get(v)
                if r is None:
                    vals.append("")
                    continue
                txt = f"{r['train_loss']:.3f}"
                if r["test_acc"] is not None:
                    txt += f" ({r['test_acc']:.1f}%)"
                vals.append(txt + ("!" if r["nan_events"] or r["errors"] else ""))
            out.append(f"| {w} | {p} | " + " | ".join(vals) + " |")
    return out


def main_table(summary: list[dict[str, Any]]) -> list[str]:
    """Every cell with its chosen lr and all columns."""
    out = [
        "| workload | precision | optimizer | lr | train loss | val loss | test acc % | NaN | err "
        "| state | ms/step | x AdamW | guard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        acc = f"{r['test_acc']:.1f} +- {r['test_std']:.1f}" if r["test_acc"] is not None else ""
        ratio = f"{r['time_ratio']:.2f}" if r["time_ratio"] else ""
        out.append(
            f"| {r['workload']} | {r['precision']} | {r['variant']} | {r['lr']:g} | "
            f"{r['train_loss']:.3f} +- {r['train_std']:.3f} | {r['val_loss']:.3f} | {acc} | "
            f"{r['nan_events']} | {r['errors']} | {_kib(r['state_bytes'])} | "
            f"{r['step_ms']:.1f} | {ratio} | {r['guard']} |"
        )
    return out


def robustness_table(grid: list[dict[str, Any]], steps: int) -> list[str]:
    """Non-finite runs and guard activations per LM and setting."""
    out = [
        "| workload | setting | runs | non-finite runs | of which errors | diverged (finite, "
        "final > initial loss) | guard activations (runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in grid:
        out.append(
            f"| {g['workload']} | {g['setting']} | {g['runs']} | {g['non_finite']} | "
            f"{g['errors']} | {g['diverged']} | {g['guard']} ({g['guard_runs']}) |"
        )
    for g in grid:
        if g["bad_points"]:
            out.append(
                f"\nNon-finite, {g['workload']} {g['setting']}: " + "; ".join(g["bad_points"])
            )
    return out


def timing_table(timing: list[dict[str, Any]]) -> list[str]:
    """Grafted / ungrafted step time per workload and structure."""
    out = ["| workload | structure | grafted ms | ungrafted ms | ratio |", "|---|---|---|---|---|"]
    for t in timing:
        out.append(f"| {t['workload']} | {t['structure']} | {t['grafted_ms']:.2f} | "
                   f"{t['ungrafted_ms']:.2f} | {t['ratio']:.3f} |")  # fmt: skip
    return out


def warmup_table(rows: list[dict[str, Any]]) -> list[str]:
    """Final training and validation loss per warm-up schedule (mean +- std over seeds)."""
    out = ["| schedule | seeds | train loss | val loss | guard |", "|---|---|---|---|---|"]
    for name in WARMUPS:
        rs = [r for r in rows if r["schedule"] == name]
        if rs:
            tr, ts = _mean_std([r["final_train_loss"] for r in rs])
            va, vs = _mean_std([r["val_loss"] for r in rs])
            out.append(f"| {name} | {len(rs)} | {tr:.4f} +- {ts:.4f} | {va:.4f} +- {vs:.4f} | "
                       f"{sum(r['guard'] for r in rs)} |")  # fmt: skip
    return out


def render(saved: dict[str, Any]) -> str:
    """The body of the RESULTS.md section (markdown) from the saved study."""
    meta, summary = saved["meta"], saved["summary"]
    out = [
        "",
        f"Command: `{meta['command']}` ({meta['when']}, {meta['wall_min']:.1f} min wall, one "
        f"process x {meta['threads']} torch thread, {meta['cpus']} CPUs visible on a shared "
        "machine: times are indicative). Raw rows: `benchmarks/real_models.json`. " + meta["scope"],
        "",
        f"Protocol: {meta['steps']} steps per run over the workload's 8 fixed training batches; "
        f"lr per cell chosen on the validation loss (`RealWorkload.evaluate()`) from "
        f"{meta['lrs']} for every optimizer with seed 0"
        + (f", then seeds 1..{meta['seeds'] - 1} at that lr" if meta["seeds"] > 1 else "")
        + f" ({meta['seeds']} seed(s) per number). 'train loss': mean loss over the last pass "
        "over the training batches; 'test acc': digits test split (vision). SINGD+graft S: "
        "`SINGD(model, lr, grafting='adam', structures=(S, S))`, other settings default "
        "(damping 1e-3, lr_cov 1e-2, T 10, guard 0.5, fallback AdamW); 'SINGD reference': "
        "ungrafted dense, `guard=None, fallback='none'` (other parameters untrained, as the "
        "reference package does); 'SINGD defaults': `SINGD(model, lr)`; KFAC: damping 0.1, "
        "T 10 (damping 1e-3 fails Cholesky on llama). bf16-pure+comp: bf16-pure with "
        "`compensated=True` (not for AdamW). NaN: steps with a non-finite loss; err: runs "
        "ended by an optimizer error; state: optimizer state bytes (`state_bytes()` summed; "
        "AdamW: its state tensors); ms/step: median step time; x AdamW: over AdamW's in the "
        "same workload and precision (bf16-pure for +comp); guard: guard activations.",
        "",
        f"### Loss after {meta['steps']} steps (issue 16)",
        "",
        "Final training loss at the chosen lr (vision: test accuracy in brackets; `!`: a NaN "
        "event or an optimizer error).",
        "",
        *loss_table(summary, meta["steps"]),
        "",
        "### All columns",
        "",
        *main_table(summary),
        "",
        "### Issue 17 targets (measured)",
        "",
    ]
    out += _targets_lines(saved)
    out += [
        "",
        f"### Robustness grid ({meta['grid_steps']} steps per run, fp32, seed 0)",
        "",
        "Grid: " + ", ".join(f"{k} {list(v)}" for k, v in GRID.items()) + " (36 points) for "
        "'defaults+grafting' (`SINGD(model, lr, grafting='adam', lr_cov=, T=, damping=)`) and "
        "'reference' (ungrafted, `guard=None, fallback='none'`). Non-finite: a non-finite "
        "loss or an optimizer error.",
        "",
        *robustness_table(saved["grid"], meta["grid_steps"]),
        "",
        "### Step time with and without grafting (fp32, interleaved blocks)",
        "",
        *timing_table(saved["timing"]),
        "",
        f"### Preconditioner warm-up (llama, fp32, grafted, lr {meta.get('warmup_lr')})",
        "",
        *warmup_table(saved["warmup"]),
    ]
    return "\n".join(out) + "\n"


def _targets_lines(saved: dict[str, Any]) -> list[str]:
    """The targets of issues 16 and 17, each with its measured value."""
    lines, met, total = quality_check(saved["summary"])
    out = [
        f"Quality (grafted SINGD vs AdamW; LMs: train loss gap, must be <= 0; vision: test "
        f"accuracy gap, must be >= -0.5 pp): **{met} of {total} cells met**.",
        "",
        *lines,
        "",
    ]
    for g in saved["grid"]:
        if g["setting"] == "defaults+grafting":
            ref = next((x for x in saved["grid"] if x["workload"] == g["workload"]
                        and x["setting"] == "reference"), None)  # fmt: skip
            out.append(
                f"- Robustness, {g['workload']}: defaults+grafting {g['non_finite']} non-finite "
                f"of {g['runs']} (**{'met' if g['non_finite'] == 0 else 'missed'}**), "
                f"reference {ref['non_finite'] if ref else '?'} of {ref['runs'] if ref else '?'}"
                f"; guard activations {g['guard']} in {g['guard_runs']} runs."
            )
    if saved["timing"]:
        worst = max(saved["timing"], key=lambda t: t["ratio"])
        n_ok = sum(t["ratio"] <= 1.1 for t in saved["timing"])
        out.append(
            f"- Step time grafted / ungrafted <= 1.1: {n_ok} of {len(saved['timing'])} "
            f"(workload, structure) pairs met; worst {worst['ratio']:.3f} "
            f"({worst['workload']}, {worst['structure']})."
        )
    for h in saved["halfway"]:
        out.append(
            f"- Issue 16, {h['workload']}: at AdamW's lr {h['lr']:g}, SINGD defaults' loss fell "
            f"{h['defaults_fall']:.3f} vs AdamW's {h['adamw_fall']:.3f}: ratio "
            f"{h['ratio']:.2f} (**{'met' if h['ratio'] >= 0.5 else 'missed'}**, target >= 0.5)."
        )
    return out


# ---------------------------------------------------------------------- main
QUICK_ALL_PRECISIONS = ("llama", "vit")  # --quick: bf16-autocast and bf16-pure only here


def _parser() -> argparse.ArgumentParser:
    """The command line (``--help`` says what ``--quick`` cuts)."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--quick (about 7 min on one thread) cuts: 1 seed instead of 3; 40 steps "
        "instead of 200; lr grid " + str(list(QUICK_LRS)) + " instead of " + str(list(FULL_LRS))
        + "; bf16-autocast and bf16-pure (uncompensated) only on llama and vit (fp32 and "
        "bf16-pure+comp on every workload); robustness grid on llama only, 30 steps per run "
        "(full: llama, gpt2, mha-lm, 100 steps); grafting timing 3 blocks of 10 steps (full: "
        "5 of 20). Every optimizer and structure is kept. The full mode takes about 1.5-2 h "
        "on one thread (estimated from the quick run's step times; not run here).",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="the cut-down study (see below)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="steps per run (200; quick 40)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (3; quick 1)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="the shared lr grid")
    p.add_argument("--grid-workloads", nargs="*", default=None, choices=LMS)
    p.add_argument("--grid-points", type=int, default=36, help="first N grid points")
    p.add_argument("--grid-steps", type=int, default=None, help="steps per grid run (100; 30)")
    p.add_argument("--timing-workloads", nargs="*", default=None, choices=WORKLOADS)
    p.add_argument("--timing-structures", nargs="+", default=list(STRUCTURES))
    p.add_argument("--timing-blocks", type=int, default=None, help="blocks per side (5; 3)")
    p.add_argument("--timing-steps", type=int, default=None, help="steps per block (20; 10)")
    p.add_argument("--warmup-seeds", type=int, default=3, help="0 skips the warm-up study")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--json", type=Path, default=HERE / "real_models.json")
    p.add_argument("--no-write", action="store_true", help="write neither file")
    p.add_argument("--from-json", type=Path, default=None, help="re-render saved results")
    return p


def _cells(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(workload, precision) pairs to run."""
    out = []
    for w in args.workloads:
        for p in args.precisions or PRECISIONS:
            cut = args.quick and args.precisions is None and w not in QUICK_ALL_PRECISIONS
            if not (cut and p in ("bf16-autocast", "bf16-pure")):
                out.append((w, p))
    return out


def main_rows(args: argparse.Namespace, lrs: Sequence[float]) -> list[dict[str, Any]]:
    """Tuning runs (seed 0, every lr) and seed runs at each cell's chosen lr."""
    base = {"steps": args.steps, "seed": 0, "phase": "tune"}
    tasks = [
        {**base, "workload": w, "precision": p, "variant": v, "lr": lr}
        for w, p in _cells(args)
        for v in args.variants
        if applies(v, p)
        for lr in lrs
    ]
    rows = run_all(tasks, "tuning")
    key = {VARIANTS[v].label: v for v in VARIANTS}
    chosen = {(r["workload"], r["precision"], r["variant"]): r["lr"] for r in aggregate(rows)}
    seed_tasks = [
        {**base, "workload": w, "precision": p, "variant": key[v], "lr": lr, "seed": s,
         "phase": "seed"}
        for (w, p, v), lr in chosen.items()
        for s in range(1, args.seeds)
    ]  # fmt: skip
    return rows + (run_all(seed_tasks, "seeds") if seed_tasks else [])


def _defaults(args: argparse.Namespace) -> None:
    """Fill the mode-dependent defaults in place."""
    q = args.quick
    args.steps = args.steps or (40 if q else 200)
    args.seeds = args.seeds or (1 if q else 3)
    if args.grid_workloads is None:
        args.grid_workloads = ["llama"] if q else ["llama", "gpt2", "mha-lm"]
    args.grid_steps = args.grid_steps or (30 if q else 100)
    if args.timing_workloads is None:
        args.timing_workloads = list(args.workloads)
    args.timing_blocks = args.timing_blocks or (3 if q else 5)
    args.timing_steps = args.timing_steps or (10 if q else 20)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study (or re-render it); returns the saved dict plus ``markdown``."""
    args = _parser().parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
    else:
        _defaults(args)
        saved = study(args, argv)
        if not args.no_write:
            args.json.write_text(json.dumps(saved, indent=1) + "\n")
    markdown = render(saved)
    if not args.no_write:
        write_section(args.results, SECTION, markdown)
    print(markdown)
    return {**saved, "markdown": markdown}


def study(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """Every part of the study, as one JSON-able dict."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    t0 = time.time()
    lrs = tuple(args.lrs or (QUICK_LRS if args.quick else FULL_LRS))
    rows = main_rows(args, lrs)
    summary = aggregate(rows)
    grid = []
    for w in args.grid_workloads:
        grid += grid_rows(w, args.grid_steps, args.grid_points)
    timing = [
        timing_ab(w, s, args.timing_blocks, args.timing_steps)
        for w in args.timing_workloads
        for s in args.timing_structures
    ]
    adam = _adam_cell(summary, "llama", "fp32")
    warm_lr = adam["lr"] if adam else 3e-3
    warm = warmup_rows(warm_lr, args.warmup_seeds, args.steps) if args.warmup_seeds else []
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    scope = "Scope: " + (
        "**--quick** (see `--help`): 1 seed, fewer steps, a 3-value lr grid, bf16-autocast "
        "and plain bf16-pure on llama and vit only, the robustness grid on llama only. "
        "The full mode (3 seeds, 200 steps, 5 lrs, every precision everywhere, grid on "
        "llama, gpt2 and mha-lm; about 1.5-2 h on one thread) was not run in this session."
        if args.quick
        else "full mode."
    )
    meta = {
        "command": f"python benchmarks/real_models.py {cmd}".strip(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_min": (time.time() - t0) / 60,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "steps": args.steps,
        "seeds": args.seeds,
        "lrs": list(lrs),
        "grid_steps": args.grid_steps,
        "warmup_lr": warm_lr,
        "scope": scope,
    }
    return {
        "meta": meta,
        "summary": summary,
        "rows": rows,
        "grid": grid_summary(grid),
        "grid_rows": grid,
        "timing": timing,
        "warmup": warm,
        "halfway": halfway_ratios(rows, summary),
    }


if __name__ == "__main__":
    main()
