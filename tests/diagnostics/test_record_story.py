"""Tests of the data that tells a failure's story: ordered events with layer kinds,
activation norms, signed extreme eigenvalues with damping, the flight recorder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics import Recorder, Recording
from diagnostics.record import metrics as M
from singd.views import FactorView, LayerFactors


class Swapped(nn.Module):
    """Two linears whose forward order is the reverse of their definition order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.late = nn.Linear(8, 3)
        self.early = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.tanh(self.early(x)))


def _xy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _nan_at(model: Swapped, step: int) -> list[int]:
    """Make ``early``'s output NaN at ``step`` (a hook registered before any recorder's)."""
    calls = [0]

    def hook(module, args, out):
        calls[0] += 1
        return out * math.nan if calls[0] == step + 1 else None

    model.early.register_forward_hook(hook)
    return calls


def _steps(model, opt, rec, n):
    x, y = _xy()
    for _ in range(n):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss)


def test_events_come_in_the_order_they_happened_with_layer_names_and_kinds():
    model = Swapped()
    _nan_at(model, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1)
    _steps(model, opt, rec, 2)
    ev = rec.recording.events
    assert ev["order"].tolist() == list(range(len(ev)))
    first = ev.iloc[0]
    assert (first["step"], first["phase"], first["layer"], first["tensor"]) == (
        1, "forward", "early", "output",
    )  # fmt: skip
    assert first["kind"] == "Linear 6→8"
    phases = ev[ev.step == 1]["phase"].tolist()
    rank = {"forward": 0, "backward": 1, "parameter update": 2}
    assert phases == sorted(phases, key=rank.__getitem__)  # forward, then backward, then update
    loss_at = ev[(ev.step == 1) & (ev.tensor == "loss")].index[0]
    assert ev.loc[: loss_at - 1, "phase"].eq("forward").all()
    back = ev[(ev.step == 1) & (ev.phase == "backward")]["layer"].tolist()
    assert back.index("late") < back.index("early")  # backward runs from the last layer
    layers = rec.recording.meta["layers"]
    assert [d["layer"] for d in layers] == ["early", "late"]  # forward order, not definition
    assert layers[0]["kind"] == "Linear 6→8" and layers[1]["kind"] == "Linear 8→3"


def test_activation_and_output_gradient_norms_match_the_tensors_on_recorded_steps():
    model = Swapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}

    def keep(module, args, out):
        seen["out"] = out.detach()
        out.register_hook(lambda g: seen.__setitem__("grad", g.detach()))

    model.early.register_forward_hook(keep)
    rec = Recorder(opt, model, every=2)
    _steps(model, opt, rec, 1)
    m = rec.recording.metrics
    early = m[(m.step == 0) & (m.layer == "early")]
    out = early[(early.factor == "output") & (early.metric == "norm")]["value"].item()
    grad = early[(early.factor == "grad_output") & (early.metric == "norm")]["value"].item()
    rms = early[(early.factor == "output") & (early.metric == "rms")]["value"].item()
    assert out == pytest.approx(float(seen["out"].norm()), rel=1e-6)
    assert grad == pytest.approx(float(seen["grad"].norm()), rel=1e-6)
    assert rms == pytest.approx(float(seen["out"].pow(2).mean().sqrt()), rel=1e-6)
    _steps(model, opt, rec, 1)  # step 1 is not recorded: no activation rows
    assert not (rec.recording.metrics.step == 1).any()


class SymmetricFactorSGD(torch.optim.SGD):
    """SGD with a KFAC-like view: one symmetric factor ``A`` and a ``damping`` in its group."""

    def __init__(self, model: nn.Linear, a: torch.Tensor, damping: float) -> None:
        super().__init__(model.parameters(), lr=0.0)
        self.param_groups[0]["damping"] = damping
        self.a = a

    def preconditioner_factors(self) -> dict[str, LayerFactors]:
        return {
            "lin": LayerFactors("lin", "Linear", {"A": FactorView(self.a, "symmetric", "dense")})
        }


def test_symmetric_factors_keep_a_signed_smallest_eigenvalue_and_the_damped_condition():
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(3, 3))
    a = torch.diag(torch.tensor([2.0, 0.5, -0.004]))
    opt = SymmetricFactorSGD(model.lin, a, damping=0.01)
    rec = Recorder(opt, model, every=1, workers=0, budget=None)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    rec.step(loss=1.0)
    m = rec.recording.metrics.set_index(["factor", "metric"])["value"]
    assert m[("A", "eig_min")] == pytest.approx(-0.004)
    assert m[("A", "eig_max")] == pytest.approx(2.0)
    assert m[("A", "cond_damped")] == pytest.approx(2.01 / 0.006)
    assert m[("(optimizer)", "damping")] == 0.01


def test_the_power_estimate_of_a_symmetric_factor_keeps_a_negative_smallest_eigenvalue():
    a = torch.diag(torch.tensor([3.0, 1.0, 0.5, -0.2], dtype=torch.float64))
    ((eig, estimated),) = M.parts_spectra([("symmetric", "dense", [a], 4)], max_dim=2)
    assert estimated and eig[0] == pytest.approx(3.0, rel=1e-3)
    assert eig[-1] == pytest.approx(-0.2, abs=1e-2)


def test_flight_recorder_saves_every_factor_before_and_at_the_first_event(tmp_path):
    from singd import SINGD

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SINGD(model, lr=1e-2, T=1)
    rec = Recorder(opt, model, every=1, flight=2, workers=0)
    x, y = _xy()
    kept = {}
    for i in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if i == 4:
            model[2].weight.grad[0, 0] = math.nan
        opt.step()
        factors = opt.preconditioner_factors()
        kept[i] = factors["0"].factors["K"].dense().numpy().copy()
        rec.step(loss=loss)
    r = Recording.load(rec.recording.save(tmp_path / "r.rec"))
    first = int(r.events["step"].min())
    snaps = {(s.step, s.layer, s.factor): s.matrix for s in r.snapshots}
    assert {s for s, _, _ in snaps} == {first - 2, first - 1, first}
    assert {(ly, f) for _, ly, f in snaps} >= {("0", "K"), ("0", "C"), ("2", "K"), ("2", "C")}
    for s in (first - 2, first - 1, first):
        np.testing.assert_array_equal(snaps[(s, "0", "K")], kept[s])


def test_flight_recorder_saves_the_factors_at_a_recorded_error():
    from singd import SINGD

    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = SINGD(model, lr=1e-2)
    rec = Recorder(opt, model, every=1, workers=0)
    _steps(model, opt, rec, 3)
    rec.record_error(RuntimeError("boom"), layer="2")
    assert {s.step for s in rec.recording.snapshots} == {0, 1, 2, 3}  # 3 kept + the error's
    assert rec.recording.errors["kind"].item() == "Linear 5→3"


def test_loading_a_file_with_errors_among_the_events_moves_them_to_the_errors_table(tmp_path):
    from diagnostics.record.recording import frame_from_rows

    counts = {"numel": 4, "n_nan": 1, "n_posinf": 0, "n_neginf": 0}
    ev = [
        {"step": 1, "phase": "backward", "layer": "0", "tensor": "weight.grad", **counts},
        {"step": 2, "phase": "preconditioner update", "layer": "0", "tensor": "A_inv",
         **counts, "message": "KFACInverseError: not PD"},
    ]  # fmt: skip
    old = Recording(events=frame_from_rows("events", ev))
    old.events = old.events.drop(columns=["order", "kind"])
    path = old.save(tmp_path / "old.rec")
    import json
    import zipfile

    with zipfile.ZipFile(path) as zf:  # an older writer: no errors frame, no snapshots
        members = {n: zf.read(n) for n in zf.namelist()}
    body = json.loads(members["recording.json"])
    del body["frames"]["errors"], body["snapshots"]
    members["recording.json"] = json.dumps(body).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    r = Recording.load(path)
    assert r.events["tensor"].tolist() == ["weight.grad"]
    assert r.errors["exception"].tolist() == ["KFACInverseError"]
    assert r.events["order"].tolist() == [0]


def test_eig_min_figure_draws_the_signed_smallest_eigenvalue_against_minus_damping():
    from diagnostics.views.figures import eig_min_figure

    model = nn.Sequential()
    model.add_module("lin", nn.Linear(3, 3))
    opt = SymmetricFactorSGD(model.lin, torch.diag(torch.tensor([2.0, 0.5, -0.004])), 0.01)
    rec = Recorder(opt, model, every=1, workers=0, budget=None)
    for _ in range(2):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        rec.step(loss=1.0)
    fig = eig_min_figure(rec)
    assert [t.name for t in fig.data] == ["lin · A", "−damping (lin · A)"]
    assert list(fig.data[0].y) == pytest.approx([-0.004, -0.004])
    assert list(fig.data[1].y) == pytest.approx([-0.01, -0.01])
    assert fig.layout.yaxis.type in (None, "linear")
