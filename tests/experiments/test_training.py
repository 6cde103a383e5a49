"""Tests for the shared training function ``experiments.training.train``."""

import math

import pytest
import torch

from experiments.training import OPTIMIZERS, PRECISIONS, LinearWarmup, train


def test_adamw_learns_digits_mlp_well_above_chance():
    result = train("mlp", "adamw", epochs=3, progress=False)
    assert result.test_accuracy > 0.85
    assert result.losses[-1] < result.losses[0]
    assert result.steps == len(result.losses)
    assert len(result.val_accuracy_curve) == 3
    assert not result.diverged and result.nan_event_count == 0


def test_same_seed_reproduces_the_run_and_another_seed_does_not():
    a = train("mlp", "sgd", steps=15, seed=1, progress=False)
    b = train("mlp", "sgd", steps=15, seed=1, progress=False)
    c = train("mlp", "sgd", steps=15, seed=2, progress=False)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_steps_count_optimizer_steps_across_epoch_boundaries():
    result = train("mlp", "sgd", steps=25, batch_size=100, progress=False)
    assert result.steps == 25
    assert math.isclose(result.epochs_completed, 25 / 12)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_mode_trains_with_finite_losses(precision):
    workload = "mlp"
    result = train(workload, "adamw", precision=precision, steps=12, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    expected = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    assert {p.dtype for p in result.model.parameters()} == {expected}
    assert result.test_accuracy > 0.2


def test_bf16_pure_keeps_optimizer_state_in_bf16_and_halves_its_bytes():
    fp32 = train("mlp", "adamw", steps=3, progress=False)
    bf16 = train("mlp", "adamw", precision="bf16-pure", steps=3, progress=False)
    dtypes = {
        v.dtype
        for s in bf16.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    }
    assert dtypes == {torch.bfloat16}
    assert bf16.optimizer_state_bytes * 2 == fp32.optimizer_state_bytes


def test_adamw_state_bytes_count_both_moments_of_every_parameter():
    result = train("mlp", "adamw", steps=2, progress=False)
    param_bytes = sum(p.numel() * p.element_size() for p in result.model.parameters())
    assert result.optimizer_state_bytes == 2 * param_bytes


def test_fp16_autocast_trains_through_a_grad_scaler_and_only_there():
    result = train("mlp", "sgd", precision="fp16-autocast", steps=6, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.grad_scale is not None and result.grad_scale > 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert (
        train("mlp", "sgd", precision="bf16-autocast", steps=2, progress=False).grad_scale is None
    )


def test_divergence_stops_the_run_and_is_recorded_without_raising():
    result = train("mlp", "sgd", lr=1e6, steps=30, progress=False)
    assert result.diverged and result.stopped_early
    assert result.nan_events[0]["where"] == "loss"
    assert result.steps < 30
    assert math.isnan(result.losses[-1])


def test_divergence_with_continue_runs_all_steps_and_records_each_event():
    result = train("mlp", "sgd", lr=1e6, steps=30, on_nan="continue", progress=False)
    assert result.steps == 30 and not result.stopped_early
    loss_events = [e for e in result.nan_events if e["where"] == "loss"]
    assert len(loss_events) == sum(math.isnan(v) for v in result.losses) > 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, "optimizer must be one of 'adamw', 'sgd'"),
        ({"precision": "fp16"}, "precision must be one of 'fp32'"),
        ({"workload": "resnet"}, "workload must be one of 'mlp'"),
        ({"on_nan": "ignore"}, "on_nan must be one of 'stop', 'continue'"),
        ({"steps": 0}, "steps must be a positive int"),
        ({"steps": 3, "epochs": 1}, "at most one of epochs and steps"),
        ({"lr": -1.0}, "lr must be"),
        ({"lr_cov_warmup": 5}, "lr_cov_warmup applies only"),
    ],
)
def test_invalid_arguments_raise_value_errors_listing_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train(**{"progress": False, **kwargs})


def test_progress_bar_writes_to_stderr_when_on_and_not_when_off(capsys):
    train("mlp", "sgd", steps=3, progress=False)
    assert "mlp/sgd" not in capsys.readouterr().err
    train("mlp", "sgd", steps=3, progress=True)
    assert "mlp/sgd" in capsys.readouterr().err


def test_summary_row_holds_the_reported_metrics():
    row = train("cnn", "adamw", steps=4, progress=False).summary()
    for key in ("test_accuracy", "time_per_step", "peak_memory_bytes", "nan_events", "lr"):
        assert key in row
    assert row["time_per_step"] > 0 and row["peak_memory_bytes"] > 0


def test_linear_warmup_ramps_to_its_peak():
    w = LinearWarmup(0.1, 10)
    assert math.isclose(w(0), 0.01) and math.isclose(w(9), 0.1) and w(100) == 0.1
    with pytest.raises(ValueError, match="warm-up steps"):
        LinearWarmup(0.1, 0)


def test_optimizer_names_are_the_documented_ones():
    assert OPTIMIZERS == ("adamw", "sgd", "kfac", "singd", "ikfac")


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("kfac", {"damping": 0.1, "T": 2}),
        ("singd", {"damping": 0.1, "structures": ("diagonal", "dense")}),
        ("ikfac", {"damping": 0.1}),
    ],
)
def test_second_order_optimizers_train_through_the_same_function(optimizer, options):
    result = train("mlp", optimizer, lr=3e-3, steps=40, optimizer_options=options, progress=False)
    assert result.optimizer_name == optimizer
    assert type(result.optimizer).__name__ == ("KFAC" if optimizer == "kfac" else "SINGD")
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert result.optimizer_state_bytes == sum(
        sum(c.values()) for c in result.optimizer.state_bytes().values()
    )


def test_ikfac_means_singd_with_kfac_like_and_no_riemannian_momentum():
    result = train("mlp", "ikfac", steps=2, progress=False)
    group = result.optimizer.param_groups[0]
    assert group["kfac_like"] is True and group["alpha1"] == 0.0
    with pytest.raises(ValueError, match="kfac_like=False"):
        train("mlp", "ikfac", steps=1, optimizer_options={"kfac_like": False}, progress=False)


def test_kfac_inverse_failure_ends_the_run_as_a_recorded_error():
    options = {"factor_dtype": "bfloat16", "on_inverse_failure": "raise"}
    result = train("mlp", "kfac", steps=5, optimizer_options=options, progress=False)
    assert result.error is not None and "KFACInverseError" in result.error
    assert result.diverged and result.stopped_early and result.steps == 0


def test_recording_is_returned_with_the_run_summary_when_recording_is_on():
    result = train(
        "mlp",
        "kfac",
        steps=12,
        record=True,
        record_every=5,
        optimizer_options={"damping": 0.1},
        progress=False,
    )
    rec = result.recording
    assert rec is not None and len(rec.steps) == 12
    assert rec.summary["test_accuracy"] == result.test_accuracy
    assert not rec.spectra.empty
    assert train("mlp", "sgd", steps=2, progress=False).recording is None


def test_recording_of_a_diverging_run_holds_the_nan_event():
    result = train("mlp", "sgd", lr=1e6, steps=20, record=True, progress=False)
    assert result.diverged
    assert len(result.recording.events) >= 1


def test_adamw_fallback_takes_every_parameter_outside_linear_and_conv_layers():
    result = train(
        "vit",
        "singd",
        lr=3e-3,
        steps=3,
        fallback="adamw",
        optimizer_options={"damping": 0.1, "structures": ("diagonal", "diagonal")},
        progress=False,
    )
    assert result.optimizer.fallback_parameters() == {}
    fb = result.fallback_optimizer
    assert isinstance(fb, torch.optim.AdamW)
    in_singd = {id(p) for g in result.optimizer.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in fb.param_groups for p in g["params"]}
    assert not in_singd & in_adamw
    assert in_singd | in_adamw == {id(p) for p in result.model.parameters()}
    assert result.state_bytes["adamw_fallback"]["exp_avg"] > 0


def test_adamw_fallback_is_rejected_for_first_order_optimizers_and_bad_names():
    with pytest.raises(ValueError, match="fallback='adamw' applies only"):
        train("mlp", "sgd", steps=1, fallback="adamw", progress=False)
    with pytest.raises(ValueError, match="fallback must be one of 'builtin', 'adamw'"):
        train("mlp", "singd", steps=1, fallback="adam", progress=False)


# ---------------------------------------------------------------------------- RunSpec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, "optimizer must be one of 'adamw', 'sgd', 'kfac'"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"record_every": 0}, "record_every must be >= 1"),
        ({"epochs": 0}, "epochs must be positive"),
        ({"num_threads": 0}, "num_threads must be a positive int"),
        ({"structures": ("diagonal", "dense")}, "structures applies only to optimizer 'singd'"),
        ({"optimizer": "singd", "structures": ("dense",)}, r"structures must be a \(K, C\) pair"),
        (
            {"optimizer": "singd", "structures": ("dense", "dense"),
             "optimizer_options": {"structures": ("diagonal", "dense")}},
            "not both",
        ),
    ],
)  # fmt: skip
def test_run_spec_rejects_bad_values_naming_the_argument_and_valid_values(kwargs, match):
    from experiments import RunSpec

    with pytest.raises(ValueError, match=match):
        RunSpec(**kwargs)


def test_run_spec_rejects_a_workload_that_is_neither_a_name_nor_a_module():
    from experiments import RunSpec

    with pytest.raises(TypeError, match="workload must be a name or an nn.Module"):
        RunSpec(workload=3)


def test_run_spec_is_frozen_and_replace_checks_the_new_values():
    import dataclasses

    from experiments import RunSpec

    spec = RunSpec("mlp", "sgd", steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.steps = 4  # type: ignore[misc]
    assert dataclasses.replace(spec, seed=2).seed == 2
    with pytest.raises(ValueError, match="steps must be a positive int"):
        dataclasses.replace(spec, steps=-1)
    assert spec.learning_rate == 1e-2 and RunSpec(optimizer="adamw").learning_rate == 1e-3


def test_train_of_a_spec_is_the_run_of_the_same_keywords_and_overrides_apply():
    from experiments import RunSpec

    spec = RunSpec("mlp", "sgd", steps=6, seed=1, progress=False)
    by_spec = train(spec)
    by_keywords = train("mlp", "sgd", steps=6, seed=1, progress=False)
    assert by_spec.losses == by_keywords.losses and by_spec.spec == spec
    other_seed = train(spec, seed=2)
    assert other_seed.seed == 2 and other_seed.losses != by_spec.losses


def test_train_rejects_an_unknown_argument_listing_the_run_arguments():
    with pytest.raises(TypeError, match=r"unknown run argument\(s\) \['step'\].*'steps'"):
        train("mlp", "sgd", step=3)
    with pytest.raises(TypeError, match="workload given both"):
        train("mlp", workload="cnn")


def test_structures_field_reaches_singd_as_its_structures_option():
    result = train("mlp", "singd", steps=1, structures=["diagonal", "dense"], progress=False)
    assert result.options["structures"] == ("diagonal", "dense")
    assert result.optimizer.param_groups[0]["structures"] == ("diagonal", "dense")


def test_train_result_status_is_the_shared_run_status():
    ok = train("mlp", "sgd", steps=2, record=True, progress=False)
    diverged = train("mlp", "sgd", lr=1e6, steps=20, progress=False)
    assert (ok.status, diverged.status) == ("ok", "diverged")
    assert ok.run_summary().status == "ok" and ok.run_summary().steps == 2
    with pytest.raises(ValueError, match="record=True"):
        diverged.run_summary()
