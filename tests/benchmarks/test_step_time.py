"""Tests for benchmarks/step_time.py: the T=10 cycle split, the batch option and a tiny run."""

import pytest


@pytest.fixture(scope="module")
def step_time(load_benchmark):
    return load_benchmark("step_time", "step_time")


def test_cycle_times_split_the_update_phase_from_the_others(step_time):
    # two cycles: phase 0 (the update step) costs 10, the other nine 1 or 2
    times = [10.0, *[1.0] * 9, 10.0, *[1.0] * 8, 2.0]
    split = step_time.cycle_times(times)
    assert split["update"] == 10.0
    assert split["other"] == pytest.approx((8 * 1.0 + 1.5) / 9)
    assert split["mean"] == pytest.approx((10.0 + 8 * 1.0 + 1.5) / 10)


def test_build_takes_the_batch_size(step_time):
    seen = []
    step, opt = step_time.build("CNN", dict(T=1, structures=("diagonal", "diagonal")), batch=16)
    model = opt._layers["0"].layer.module  # the first conv: it must see 16 rows
    handle = model.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    step()
    handle.remove()
    assert seen == [16]
    assert opt.steps == 1


def test_measure_reports_every_config_with_no_statistics_left(step_time):
    results = step_time.measure("MLP", steps=10, rounds=1, warmup=0, batch=8)
    assert set(results) == {"AdamW", *(name for name, _ in step_time.CONFIGS)}
    for name, r in results.items():
        assert r["steps"] == 10 and r["median"] > 0 and r["mean"] > 0, name
        assert r["pending"] is False, name
        assert r["bytes"] > 0, name
