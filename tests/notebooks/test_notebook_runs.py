"""Each notebook run under papermill with small, non-default parameters: what it produced."""

from __future__ import annotations

from pathlib import Path


def test_natural_gradient_notebook_shows_ikfac_reaching_the_damped_inverse_and_kfac_beating_gd(
    run_notebook, tmp_path
):
    tolerance = 1e-4
    out = run_notebook(
        "01_natural_gradient.ipynb", tmp_path, n_classes=3, n_features=5, steps=15,
        damping=1e-2, lr_cov=0.3, ikfac_steps=120, tolerance=tolerance, seed=3,
        lr_kfac=0.5, min_ratio=3.0, singd_lr=1.0, singd_lr_cov=0.5, singd_alpha1=0.3,
        structures=["dense", "diagonal"],
    )  # fmt: skip
    claims = out["claims"]
    assert claims["ikfac_error"] < tolerance
    assert claims["library_error"] < tolerance
    # several times below GD, not just below it (a margin no rounding difference can eat)
    assert claims["ngd_final_loss"] * 3 < claims["gd_final_loss"]
    assert claims["kfac_final_loss"] * 3 < claims["gd_final_loss"]
    assert claims["kfac_cosine"] > claims["gradient_cosine"] + 0.01
    assert 1 <= claims["ikfac_iterations_to_tolerance"] <= 120
    # the output side: C C^T reaches (G + lambda I)^-1, in the notebook and in the library
    assert claims["ikfac_error_C"] < tolerance
    assert claims["library_error_C"] < tolerance
    # SINGD's coupled factors reach their fixed point; IKFAC and SINGD train 3x below GD
    assert claims["singd_fixed_point_distance"] < tolerance
    assert 1 <= claims["singd_iterations_to_tolerance"] <= 120
    assert claims["ikfac_final_loss"] * 3 < claims["gd_final_loss"]
    assert claims["singd_final_loss"] * 3 < claims["gd_final_loss"]
    assert [r["structure"] for r in claims["structures"]] == ["dense", "diagonal"]
    dense, diagonal = claims["structures"]
    assert all(r["final_loss"] * 3 < claims["gd_final_loss"] for r in (dense, diagonal))
    assert diagonal["factor_bytes"] * 2 < dense["factor_bytes"]  # 216 against 720 bytes
    assert 1 <= claims["diverged_iteration"] <= 50
    assert [r["label"] for r in out["runs"]] == [
        "GD, lr 1",
        "NGD, lr 1",
        "KFAC, lr 0.5",
        "KFAC, lr 1",
        "IKFAC, lr 1",
        "SINGD, lr 1",
    ]
    assert (tmp_path / "01_natural_gradient.ipynb").is_file()


def test_natural_gradient_notebook_rejects_a_bad_damping_naming_it(failing_run, tmp_path):
    error = failing_run("01_natural_gradient.ipynb", tmp_path, damping=-1.0)
    assert "ValueError" in error and "damping=-1.0" in error and "a number > 0" in error


def test_structures_notebook_trains_each_chosen_structure(run_notebook, tmp_path):
    structures = ["dense", "diagonal", "block4diagonal"]
    out = run_notebook(
        "02_structures.ipynb", tmp_path, structures=structures, k_structure="block4diagonal",
        c_structure="diagonal", picture_dim=8, max_dim=64, timing_dim=32, timing_rows=16,
        steps=40, min_accuracy=0.5,
    )  # fmt: skip
    claims = out["claims"]
    assert [r["K"] for r in claims["trained"]] == structures
    assert all(r["test_accuracy"] >= 0.5 and r["nan_events"] == 0 for r in claims["trained"])
    assert claims["bytes_at_max_dim"]["diagonal"] == 4 * 64
    assert claims["bytes_at_max_dim"]["dense"] == 4 * 64 * 64
    assert claims["chosen"]["K"] == "block4diagonal" and claims["chosen"]["C"] == "diagonal"
    by_label = {r["label"]: r for r in out["runs"]}
    assert by_label["diagonal/diagonal"]["state_bytes"] < by_label["dense/dense"]["state_bytes"]
    assert set(claims["ms_per_update"]) == set(structures)


def test_structures_notebook_rejects_an_unknown_structure_listing_forms(failing_run, tmp_path):
    error = failing_run("02_structures.ipynb", tmp_path, structures=["dense", "blocky"])
    assert "structures" in error and "'blocky'" in error and "block{N}diagonal" in error


def test_demo_runs_notebook_03_and_prints_paths_and_summary(tmp_path, capsys):
    """`python -m experiments demo` (what `make demo` runs) with small non-default parameters."""
    import json

    from diagnostics import Recording
    from experiments.__main__ import main

    params = {"optimizers": '["kfac", "singd"]', "structures": '["diagonal", "dense"]',
              "steps": "12", "record_every": "4", "min_accuracy": "0.0", "seed": "1"}  # fmt: skip
    argv = ["demo", "--out", str(tmp_path)]
    for name, value in params.items():
        argv += ["-p", name, value]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "report.html") in printed
    assert str(tmp_path / "03_half_precision_stability.ipynb") in printed
    assert "singd-bf16" in printed and "gave up" in printed
    out = json.loads((tmp_path / "results.json").read_text())
    runs = {r["label"]: r for r in out["runs"]}
    assert set(runs) == {"kfac-fp32", "singd-fp32", "kfac-bf16", "singd-bf16"}
    assert runs["singd-bf16"]["nan_inf_events"] == 0 and not runs["singd-bf16"]["error"]
    assert out["claims"]["singd_bf16_finite"] is True
    # strict KFAC cannot invert a bfloat16 factor; the notebook reports it instead of crashing
    assert "KFACInverseError" in runs["kfac-bf16"]["error"]
    for label, row in runs.items():
        rec = Recording.load(tmp_path / row["recording"])
        assert rec.name == label and (len(rec.steps) >= 1 or row["error"])
        assert rec.summary["why"]
    report = (tmp_path / "report.html").read_text()
    assert "singd-bf16" in report and "<script src=" not in report


def test_half_precision_notebook_rejects_float8_naming_dtype_and_valid_values(
    failing_run, tmp_path
):
    error = failing_run("03_half_precision_stability.ipynb", tmp_path, dtype="float8")
    assert "dtype='float8'" in error and "['bfloat16', 'float16', 'float32']" in error


def test_sweep_of_half_precision_notebook_reports_bad_combination_and_feeds_notebook_04(
    run_notebook, notebooks_dir, tmp_path
):
    from experiments.sweep import run_sweep

    sweep = tmp_path / "sweep"
    grid = {
        "dtype": ["bfloat16", "float16"],
        "mode": ["pure", "autocast"],  # float16 + pure is invalid: that row must fail
        "optimizers": [["singd"]],
        "structures": [["diagonal", "diagonal"]],
        "compare_fp32": [False],
        "steps": [6],
        "record_every": [3],
        "min_accuracy": [0.0],
    }
    summary = run_sweep(notebooks_dir / "03_half_precision_stability.ipynb", grid, sweep, jobs=2)
    assert len(summary) == 4
    failed = summary[summary["status"] == "failed"]
    assert list(zip(failed["dtype"], failed["mode"])) == [("float16", "pure")]
    assert "mode='pure'" in failed["error"].iloc[0] and "autocast" in failed["error"].iloc[0]
    ok = summary[summary["status"] == "ok"]
    assert len(ok) == 3 and (ok["nan_inf_events"] == 0).all()
    assert all((Path(p)).is_file() for p in ok["recording"])
    assert len((sweep / "summary.csv").read_text().strip().splitlines()) == 5
    assert (sweep / "report.html").stat().st_size > 0

    out = run_notebook("04_sweep_report.ipynb", tmp_path / "nb04", sweep_dir=str(sweep))
    claims = out["claims"]
    assert claims["combinations"] == 4 and claims["failed"] == 1
    assert claims["training_runs"] == 3 and claims["recordings"] == 3
