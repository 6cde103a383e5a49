"""Each notebook run under papermill with small, non-default parameters: what it produced."""

from __future__ import annotations


def test_natural_gradient_notebook_shows_ikfac_reaching_the_damped_inverse(run_notebook, tmp_path):
    tolerance = 1e-4
    out = run_notebook(
        "01_natural_gradient.ipynb", tmp_path, n_classes=3, n_features=5, steps=15,
        damping=1e-2, lr_cov=0.3, ikfac_steps=120, tolerance=tolerance, seed=3,
    )  # fmt: skip
    claims = out["claims"]
    assert claims["ikfac_error"] < tolerance
    assert claims["library_error"] < tolerance
    assert claims["ngd_final_loss"] < claims["gd_final_loss"]
    assert claims["kfac_final_loss"] < claims["gd_final_loss"]
    assert 1 <= claims["ikfac_iterations_to_tolerance"] <= 120
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
