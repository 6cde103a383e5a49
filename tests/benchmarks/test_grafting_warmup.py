"""Tests for benchmarks/grafting_warmup.py: a tiny run prints one table row per setting."""

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_comparison_prints_a_row_with_three_finite_loss_pairs(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "grafting_warmup", ROOT / "benchmarks" / "grafting_warmup.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["grafting_warmup.py", "--workloads", "mha-lm", "--lrs", "0.003", "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "2"])
    module.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mha")]
    assert len(rows) == 1
    pairs = re.findall(r"(\d+\.\d+) / (\d+\.\d+)", rows[0])
    assert len(pairs) == 3 and all(0 < float(x) < 10 for pair in pairs for x in pair)
