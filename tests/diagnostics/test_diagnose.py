"""Tests of diagnostics.diagnose: the origin of faults injected into a small HF Llama under
AdamW and SINGD, silent deaths without NaN, stalled bf16 parameters, the text forms."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics import Recorder, Recording, diagnose

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

AT = 8  # the step at which a fault starts (after 8 recorded healthy steps)
STEPS = 13
DOWN = "model.layers.0.mlp.down_proj"
O_PROJ = "model.layers.1.self_attn.o_proj"


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return transformers.LlamaForCausalLM(cfg)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    from singd import SINGD

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RMSNorm weights go to the fallback, as intended
        return SINGD(model, lr=1e-2, T=1)


def _run(opt_name: str, fault: str | None, target: str = DOWN) -> Recording:
    """Train the Llama for STEPS steps, recording every step, with a fault from step AT:
    ``weight``: the target's weight times 1e6; ``silent``: times 1e30; ``scale``: its
    forward output times 10, 100, 1000, ... (a forward hook)."""
    model = _llama()
    module = model.get_submodule(target)
    opt = _optimizer(opt_name, model)
    if fault == "scale":
        calls = [0]

        def scale(mod, args, out):
            calls[0] += 1
            k = calls[0] - AT
            return out * 10.0**k if k > 0 else None

        module.register_forward_hook(scale)
    ids = _tokens()
    rec = Recorder(opt, model, every=1, workers=0)
    for i in range(STEPS):
        if fault in ("weight", "silent") and i == AT:
            with torch.no_grad():
                module.weight.mul_(1e6 if fault == "weight" else 1e30)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    rec.close()
    return rec.recording


@pytest.mark.parametrize("opt_name", ["adamw", "singd"])
@pytest.mark.parametrize("fault", ["weight", "scale"])
def test_origin_is_the_layer_a_fault_was_injected_into_not_the_loss_or_later_layers(
    opt_name, fault
):
    d = diagnose(_run(opt_name, fault))
    assert (d.origin, d.origin_step) == (DOWN, AT), str(d)
    later = d.findings[d.findings.step >= AT]["layer"]
    assert later.iloc[0] == DOWN and "(model)" not in set(d.findings["layer"].head(1))


def test_origin_follows_the_fault_to_another_layer():
    d = diagnose(_run("adamw", "scale", target=O_PROJ))
    assert (d.origin, d.origin_step) == (O_PROJ, AT), str(d)


@pytest.mark.parametrize("opt_name", ["adamw", "singd"])
def test_a_silent_death_without_nan_is_caught_and_attributed(opt_name):
    r = _run(opt_name, "silent")
    loss = r.steps["loss"]
    assert loss.notna().all() and (loss.iloc[AT:] > 4.0).all()  # log(64) = 4.16, no NaN
    d = diagnose(r)
    assert (d.origin, d.origin_step) == (DOWN, AT), str(d)
    kinds = set(d.findings[d.findings.layer == "(model)"]["kind"])
    assert "vanished" in kinds, str(d)  # the residual stream is zeroed: no gradient flows
    if opt_name == "adamw":  # it had learned below log(64): the loss jumps back up
        assert "loss jump" in kinds, str(d)


def test_a_healthy_run_has_no_origin():
    d = diagnose(_run("adamw", None))
    assert d.origin is None and len(d.findings) == 0, str(d)
    assert str(d).splitlines()[1] == "No layer left its recent range."


def test_text_and_html_forms_name_the_origin_and_its_kind(tmp_path):
    r = Recording.load(_run("adamw", "weight").save(tmp_path / "r.rec"))  # from the file alone
    d = diagnose(r)
    assert f"Trouble started in {DOWN} (Linear 128→64) at step {AT}" in str(d)
    html = d._repr_html_()
    assert DOWN in html and "<table" in html
    assert list(d.findings.columns) == ["step", "layer", "factor", "kind", "evidence", "message"]


def _bf16_norm_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)).to(torch.bfloat16)


def test_bf16_norm_weights_near_one_stall_under_adamw_and_diagnose_names_them():
    model = _bf16_norm_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = Recorder(opt, model, every=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 4, (64,), generator=g)
    weight_before = model[1].weight.detach().clone()
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    assert torch.equal(model[1].weight, weight_before)  # the premise: it really stalled
    d = diagnose(rec.recording)
    assert d.stalled == ["1.weight"], str(d)
    m = rec.recording.metrics
    lost = m[m.metric == "update_lost"].groupby(["layer", "factor"])["value"].median()
    stuck = m[m.metric == "stuck_frac"].groupby(["layer", "factor"])["value"].median()
    assert lost[("1", "weight")] > 0.99 and stuck[("1", "weight")] == 1.0
    assert lost[("0", "weight")] < 0.5 and stuck[("0", "weight")] < 0.5
    assert "rounding" in set(d.findings[d.findings.layer == "1"]["kind"])


def test_float32_parameters_that_move_are_not_stalled():
    model = _bf16_norm_model().float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = Recorder(opt, model, every=1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    assert diagnose(rec.recording).stalled == []
    assert not (rec.recording.metrics.metric == "update_lost").any()  # 16-bit only


def test_a_kfac_inverse_failure_is_attributed_to_the_layer_its_message_names():
    from experiments.training import train

    options = {"factor_dtype": "bfloat16", "on_inverse_failure": "raise"}
    result = train("mlp", "kfac", steps=3, optimizer_options=options, record=True, progress=False)
    d = diagnose(result.recording)
    assert d.origin == "1" and d.findings["kind"].iloc[0] == "error", str(d)
    assert "KFACInverseError" in str(d)
