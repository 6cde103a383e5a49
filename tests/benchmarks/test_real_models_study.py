"""Tests for benchmarks/real_models.py: its smallest configuration end to end and the lr choice."""

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("real_models", "real_models_study")


SMALLEST = [
    "--workloads", "llama", "--precisions", "fp32", "--variants", "adamw", "diagonal",
    "defaults", "--steps", "2", "--lrs", "0.01", "--seeds", "1", "--grid-workloads", "llama",
    "--grid-points", "1", "--grid-steps", "2", "--timing-structures", "diagonal",
    "--timing-blocks", "1", "--timing-steps", "2", "--warmup-seeds", "1",
]  # fmt: skip


def test_smallest_configuration_writes_json_and_the_results_section(study, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\nkeep me\n")
    out = study.main([*SMALLEST, "--json", str(tmp_path / "r.json"), "--results", str(results)])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == {"meta", "summary", "rows", "grid", "grid_rows", "timing", "warmup",
                          "halfway"}  # fmt: skip
    assert {r["variant"] for r in saved["summary"]} == {
        "AdamW", "SINGD+graft diagonal", "SINGD defaults"}  # fmt: skip
    for r in saved["summary"]:
        assert r["lr"] == 0.01 and r["seeds"] == 1 and math.isfinite(r["train_loss"])
        assert r["state_bytes"] > 0 and r["nan_events"] == 0 and r["time_ratio"] > 0
    assert [(g["setting"], g["runs"]) for g in saved["grid"]] == [
        ("defaults+grafting", 1), ("reference", 1)]  # fmt: skip
    assert saved["timing"][0]["ratio"] > 0 and len(saved["warmup"]) == len(study.WARMUPS)
    assert saved["halfway"][0]["workload"] == "llama"
    text = results.read_text()
    assert "keep me" in text and text.count("## Real models") == 1
    assert "python benchmarks/real_models.py --workloads llama" in text
    assert "### Loss after 2 steps (issue 16)" in text and out["markdown"].strip() in text
    again = study.main(["--from-json", str(tmp_path / "r.json"), "--no-write"])
    assert again["markdown"] == out["markdown"]


def test_lr_choice_uses_validation_loss_and_ranks_non_finite_runs_last(study):
    rows = [
        {"lr": 0.1, "val_loss": 0.5, "nan_events": 1, "error": None},
        {"lr": 0.03, "val_loss": 0.6, "nan_events": 0, "error": "KFACInverseError"},
        {"lr": 0.01, "val_loss": 1.0, "nan_events": 0, "error": None},
        {"lr": 0.001, "val_loss": 1.2, "nan_events": 0, "error": None},
    ]
    assert study.choose_lr(rows) == 0.01
    assert study.choose_lr(rows[:2]) in (0.1, 0.03)


def test_adamw_has_no_compensated_cell(study):
    assert not study.applies("adamw", "bf16-pure+comp") and study.applies("adamw", "bf16-pure")
    assert study.applies("diagonal", "bf16-pure+comp")
