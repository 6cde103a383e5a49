"""Tests for benchmarks/grafting_warmup.py: a tiny run prints one table row per setting."""

import re
import sys


def test_tiny_comparison_prints_a_row_with_three_finite_loss_pairs(
    load_benchmark, monkeypatch, capsys
):
    module = load_benchmark("grafting_warmup")
    argv = ["grafting_warmup.py", "--workloads", "mha-lm", "--lrs", "0.003", "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "2"])
    module.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mha")]
    assert len(rows) == 1
    pairs = re.findall(r"(\d+\.\d+) / (\d+\.\d+)", rows[0])
    assert len(pairs) == 3 and all(0 < float(x) < 10 for pair in pairs for x in pair)
