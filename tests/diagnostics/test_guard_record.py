"""Tests that activations of a factor-update guard (``optimizer.guard_activations()``) are
recorded once each, show up in `diagnose` as findings of kind "guard" and in the report.
A fake optimizer stands in for SINGD: no dependency on singd's internals."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from diagnostics import Recorder, diagnose
from diagnostics.views.report import report_html


class _Activation(NamedTuple):
    step: int
    layer: str
    factor: str
    reach: float


class _GuardedSGD(torch.optim.SGD):
    """SGD that logs a guard activation at the steps in ``fire`` (as SINGD's guard does)."""

    def __init__(self, model: nn.Module, fire: dict[int, list[tuple[str, str, float]]]) -> None:
        super().__init__([{"params": model.parameters(), "guard": 0.5}], lr=0.01)
        self.fire, self.count, self.log = fire, 0, []

    def step(self, closure=None):  # noqa: D102
        super().step(closure)
        for layer, factor, reach in self.fire.get(self.count, []):
            self.log.append(_Activation(self.count, layer, factor, reach))
        self.count += 1

    def guard_activations(self) -> list[_Activation]:
        return list(self.log)


def _train(fire: dict, steps: int = 12, every: int = 4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = _GuardedSGD(model, fire)
    rec = Recorder(opt, model, every=every, workers=0)
    x = torch.randn(8, 3)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    rec.close()
    return rec.recording


def test_each_guard_activation_is_one_row_at_its_own_step_with_its_limit():
    fire = {1: [("0", "K", 3.2)], 6: [("2", "C", 0.9), ("0", "K", 1.5)], 10: [("2", "K", 0.7)]}
    rec = _train(fire)
    reach = rec.metric("guard_reach")
    got = sorted(zip(reach["step"], reach["layer"], reach["factor"], reach["value"]))
    assert got == [(1, "0", "K", 3.2), (6, "0", "K", 1.5), (6, "2", "C", 0.9), (10, "2", "K", 0.7)]
    limit = rec.metric("guard")
    assert len(limit) == 4 and set(limit["value"]) == {0.5}
    assert list(rec.metrics["step"]) == sorted(rec.metrics["step"])  # rows stay in step order


def test_diagnose_reports_one_guard_finding_per_factor_that_never_becomes_the_origin():
    rec = _train({1: [("0", "K", 3.2)], 2: [("0", "K", 4.0)], 6: [("2", "C", 0.9)]})
    d = diagnose(rec)
    guard = d.findings[d.findings["kind"] == "guard"]
    assert list(zip(guard["step"], guard["layer"], guard["factor"])) == [
        (1, "0", "K"),
        (6, "2", "C"),
    ]
    assert guard["message"].iloc[0] == "guard shrank lr_cov for factor K (reach 3.2 > 0.5)"
    assert "2 activation(s), largest reach 4" in guard["evidence"].iloc[0]
    assert d.origin is None
    assert "guard shrank lr_cov for factor K (reach 3.2 &gt; 0.5)" in report_html(rec)


def test_an_optimizer_without_guard_activations_records_no_guard_rows():
    rec = _train({})
    assert len(rec.metric("guard_reach")) == 0
    assert (diagnose(rec).findings["kind"] != "guard").all()
