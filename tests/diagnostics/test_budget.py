"""Tests of the recorder's time budget: which factors get exact spectra, what is skipped."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics import Recorder


def _singd_run(steps: int, **kwargs) -> Recorder:
    from singd import SINGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SINGD(model, lr=1e-2, T=1)
    rec = Recorder(opt, model, every=1, workers=0, **kwargs)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    return rec


def _estimated(rec: Recorder):
    m = rec.recording.metrics
    return m[m.metric == "spectrum_estimated"].pivot_table(
        index="step", columns=["layer", "factor"], values="value"
    )


def test_a_budget_that_fits_one_big_factor_gives_every_factor_an_exact_spectrum_in_turn():
    from singd import SINGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SINGD(model, lr=1e-2, T=1)
    rec = Recorder(opt, model, every=1, workers=0)
    rec._available = lambda: rec._factors._per_cube * 7**3 * 1.01  # the largest K is 7x7
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.step(loss=1.0)
    est = _estimated(rec)
    assert (est == 1).any().any()  # some were skipped at each step...
    assert (est == 0).any().all()  # ...but every factor had an exact spectrum
    st = rec.recording.steps
    assert (st["spectra_exact"] + st["spectra_estimated"] == 4).all()
    assert (st["spectra_estimated"] >= 1).all()


def test_skipped_factors_get_power_iteration_extremes_close_to_the_exact_largest_eigenvalue():
    exact = _singd_run(3, budget=None).recording.metrics
    rough_rec = _singd_run(3, budget=1e-9)
    rough = rough_rec.recording.metrics
    est = _estimated(rough_rec)
    assert (est == 1).all().all()  # no time at all: every dense factor estimated
    key = ["step", "layer", "factor", "metric"]
    a = exact[exact.metric == "eig_max"].set_index(key)["value"]
    b = rough[rough.metric == "eig_max"].set_index(key)["value"]
    assert b.to_numpy() == pytest.approx(a.loc[b.index].to_numpy(), rel=2e-2)
    assert math.isnan(_singd_run(1, budget=None).recording.steps["spectra_estimated"].iloc[0])


@pytest.mark.parametrize("bad", [0, -0.1, True, "5%"])
def test_a_budget_must_be_a_positive_fraction_or_none(bad):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="budget"):
        Recorder(torch.optim.SGD(model.parameters(), lr=0.1), model, budget=bad)
