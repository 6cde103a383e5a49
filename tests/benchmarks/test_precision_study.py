"""Tests for benchmarks/precision_study.py: storage formulas and a --quick MLP run."""

import json

import pytest
import torch

from singd.structures import structure


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("precision_study", "precision_study")


@pytest.mark.parametrize(
    "name", ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"]
)
@pytest.mark.parametrize("d", [1, 10, 16, 29, 31, 65, 129, 513])
def test_storage_formula_matches_what_the_structure_allocates(study, name, d):
    allocated = structure(name).eye(d, dtype=torch.float32).numel()
    assert study.stored_entries(name, d) == allocated


def test_lr_choice_uses_validation_accuracy_and_ranks_failed_runs_last(study):
    rows = [
        {"lr": 0.1, "val_accuracy": 0.99, "nan_events": 1, "error": None},
        {"lr": 0.03, "val_accuracy": 0.90, "nan_events": 0, "error": "KFACInverseError"},
        {"lr": 0.01, "val_accuracy": 0.95, "nan_events": 0, "error": None, "test_accuracy": 0.0},
        {"lr": 0.001, "val_accuracy": 0.94, "nan_events": 0, "error": None, "test_accuracy": 1.0},
    ]
    assert study.choose_lr(rows) == 0.01


def test_write_section_replaces_only_its_own_section(study, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(
        "# Results\n\n## Other\nkeep me\n\n## Half-precision study\nold\n\n## Last\nx\n"
    )
    study.write_section(path, study.SECTION, "\nnew body\n")
    text = path.read_text()
    assert "keep me" in text and "## Last\nx" in text and "new body" in text
    assert "old" not in text
    study.write_section(path, study.SECTION, "\nnewer\n")
    assert path.read_text().count("## Half-precision study") == 1


def test_quick_mlp_study_runs_every_variant_and_precision_and_writes_its_section(study, tmp_path):
    results, raw = tmp_path / "RESULTS.md", tmp_path / "study.json"
    results.write_text("# Results\n\n## Someone else\nuntouched\n")
    argv = ["--quick", "--workloads", "mlp", "--steps", "3", "--jobs", "1"]
    out = study.main([*argv, "--results", str(results), "--json", str(raw)])
    variants = [v for v in study.VARIANTS if "mlp" in v.workloads]
    n_variants, n_precisions = len(variants), 4
    assert len(out["summary"]) == n_variants * n_precisions
    assert len(out["rows"]) == sum(len(v.lr_grid) for v in variants) * n_precisions
    text = results.read_text()
    assert "## Someone else\nuntouched" in text
    assert text.count("| mlp |") == n_variants * n_precisions
    assert "python benchmarks/precision_study.py --quick" in text
    assert "KFAC/SINGD" in text and "Target" in text
    saved = json.loads(raw.read_text())
    assert {r["variant"] for r in saved["summary"]} == {v.label for v in variants}
    again = study.main(["--from-json", str(raw), "--no-write"])
    assert again["markdown"] == out["markdown"]
