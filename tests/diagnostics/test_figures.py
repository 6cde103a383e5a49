"""Tests of diagnostics.views.figures: the expected traces, controls and file formats."""

from __future__ import annotations

import json
import shutil

import plotly.graph_objects as go
import pytest

from diagnostics import Recording
from diagnostics.record.recording import frame_from_rows
from diagnostics.views.figures import (
    all_figures,
    as_recordings,
    condition_figure,
    curves_figure,
    events_figure,
    memory_figure,
    save_figure,
    spectrum_figure,
)


def _rec(name: str, *, events: bool = True, cond_scale: float = 1.0) -> Recording:
    steps = frame_from_rows(
        "steps",
        [{"step": s, "recorded": s % 2 == 0, "loss": 2.0 / (s + 1), "accuracy": 0.1 * s}
         for s in range(5)],
    )  # fmt: skip
    metrics, spectra = [], []
    for s in (0, 2, 4):
        for layer in ("0", "2"):
            for factor in ("K", "C"):
                eig = [4.0 * cond_scale * (s + 1), 2.0, 1.0]
                metrics.append({"step": s, "layer": layer, "factor": factor, "metric": "cond",
                                "value": eig[0] / eig[-1]})  # fmt: skip
                for i, v in enumerate(eig):
                    spectra.append({"step": s, "layer": layer, "factor": factor, "index": i,
                                    "value": v})  # fmt: skip
    ev = []
    if events:
        ev = [
            {"step": 3, "phase": "backward", "layer": "2", "tensor": "weight.grad",
             "dtype": "float16", "shape": "(3, 5)", "numel": 15, "n_nan": 2, "n_posinf": 0,
             "n_neginf": 0, "finite_absmax": 10.0, "grad_scale": 512.0, "skipped": True},
            {"step": 4, "phase": "forward", "layer": "0", "tensor": "output",
             "dtype": "float16", "shape": "(8, 5)", "numel": 40, "n_nan": 0, "n_posinf": 3,
             "n_neginf": 1, "finite_absmax": 60000.0, "grad_scale": float("nan"),
             "skipped": False},
        ]  # fmt: skip
    memory = [
        {"step": 4, "layer": "0", "component": "K", "bytes": 100},
        {"step": 4, "layer": "0", "component": "C", "bytes": 50},
        {"step": 4, "layer": "2", "component": "K", "bytes": 30},
        {"step": 4, "layer": "(process)", "component": "peak_rss", "bytes": 10**8},
    ]
    return Recording(
        name=name,
        steps=steps,
        metrics=frame_from_rows("metrics", metrics),
        spectra=frame_from_rows("spectra", spectra),
        events=frame_from_rows("events", ev),
        memory=frame_from_rows("memory", memory),
        summary={"test_accuracy": 0.9},
    )


def test_as_recordings_accepts_one_list_dict_and_renames_duplicates():
    a = _rec("run")
    assert [r.name for r in as_recordings(a)] == ["run"]
    assert [r.name for r in as_recordings([a, a])] == ["run", "run (2)"]
    assert [r.name for r in as_recordings({"x": a, "y": a})] == ["x", "y"]
    with pytest.raises(TypeError, match="Recording"):
        as_recordings(42)
    with pytest.raises(ValueError):
        as_recordings([])


def test_spectrum_figure_has_one_heatmap_per_layer_and_factor_and_a_dropdown():
    fig = spectrum_figure(_rec("a"))
    assert isinstance(fig, go.Figure)
    assert [t.type for t in fig.data] == ["heatmap"] * 4
    assert [t.visible for t in fig.data] == [True, False, False, False]
    buttons = fig.layout.updatemenus[0].buttons
    # layers are labelled by name and what they map (here from their factors' sizes)
    assert [b.label for b in buttons] == [
        "0 · 3→3 · K",
        "0 · 3→3 · C",
        "2 · 3→3 · K",
        "2 · 3→3 · C",
    ]
    assert buttons[2].args[0]["visible"] == [False, False, True, False]
    hm = fig.data[0]
    assert list(hm.x) == [0, 2, 4] and list(hm.y) == [0, 1, 2]
    assert hm.z[0][1] == pytest.approx(1.0795, abs=1e-3)  # log10(4 * 3) at step 2


def test_spectrum_figure_for_two_runs_names_runs_in_the_dropdown_and_filters():
    fig = spectrum_figure([_rec("a"), _rec("b")], factor="K")
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels == ["a · 0 · 3→3 · K", "a · 2 · 3→3 · K", "b · 0 · 3→3 · K", "b · 2 · 3→3 · K"]


def test_spectrum_figure_without_spectra_says_so():
    empty = Recording(name="adamw")
    fig = spectrum_figure(empty)
    assert len(fig.data) == 0 and "no spectra" in fig.layout.annotations[0].text


def test_condition_figure_shows_one_run_at_a_time_picked_by_a_dropdown():
    fig = condition_figure([_rec("a"), _rec("b", cond_scale=10)])
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.exponentformat == "power"
    assert [t.visible for t in fig.data] == [True] * 4 + [False] * 4
    assert fig.data[0].name == "0 · 3→3 · K" and fig.layout.title.text.endswith(": a")
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["a", "b"]
    assert menu.buttons[1].args[0]["visible"] == [False] * 4 + [True] * 4
    assert list(fig.data[4].y) == [40.0, 120.0, 200.0]
    shown = condition_figure([_rec("a"), _rec("b")], run="b")
    assert [t.visible for t in shown.data] == [False] * 4 + [True] * 4


def _factor_rec(name: str, meta: dict, rows: list[tuple[str, str, str, float]]) -> Recording:
    metrics = [{"step": s, "layer": ly, "factor": fa, "metric": me, "value": v}
               for s in (0, 10) for ly, fa, me, v in rows]  # fmt: skip
    return Recording(name=name, metrics=frame_from_rows("metrics", metrics), meta=meta)


def test_condition_figure_leaves_out_optimizer_moments_and_inverses():
    adam = _factor_rec("adamw", {"optimizer": "AdamW"}, [("1", "weight.exp_avg_sq", "cond", 1e5)])
    assert len(condition_figure(adam).data) == 0
    kfac = _factor_rec("kfac", {}, [("1", "A_inv", "cond", 3.0), ("1", "A_inv", "eig_min", 1.0)])
    assert len(condition_figure(kfac).data) == 0


def test_condition_figure_plots_the_damped_kfac_factor_and_keeps_the_raw_one_in_the_legend():
    meta = {"optimizer": "KFAC", "hyperparameters": [{"damping": 0.1, "inverse_method": "x"}]}
    rows = [("1", "A", "eig_min", 0.0), ("1", "A", "eig_max", 10.0), ("1", "A", "cond", 1e20)]
    fig = condition_figure(_factor_rec("kfac", meta, rows))
    damped, raw = fig.data
    assert damped.name.endswith("A + λI") and damped.visible is True
    assert list(damped.y) == pytest.approx([101.0, 101.0])  # (10 + 0.1) / (0 + 0.1)
    assert "λ = 0.1" in damped.hovertemplate
    assert raw.name.endswith("(undamped)") and raw.visible == "legendonly"
    singd = _factor_rec("singd", {"optimizer": "SINGD", "hyperparameters": [{"damping": 0.1}]},
                        [("1", "K", "eig_min", 1.0), ("1", "K", "cond", 5.0)])  # fmt: skip
    (line,) = condition_figure(singd).data
    assert list(line.y) == [5.0, 5.0] and "K·Kᵀ" in line.hovertemplate


def test_condition_figure_prefers_the_recorded_damped_condition_and_layer_damping():
    meta = {"optimizer": "KFAC", "hyperparameters": [{"damping": 0.1}]}
    rows = [("1", "A", "eig_min", 0.0), ("1", "A", "eig_max", 10.0), ("1", "A", "cond_damped", 7.0),
            ("1", "(optimizer)", "damping", 0.5)]  # fmt: skip
    damped = condition_figure(_factor_rec("kfac", meta, rows)).data[0]
    assert list(damped.y) == [7.0, 7.0] and "λ = 0.5" in damped.hovertemplate


def test_events_figure_has_one_trace_per_phase_with_event_fields_in_hover():
    fig = events_figure(_rec("a"))
    assert [t.name for t in fig.data] == ["forward", "backward"]
    fwd = fig.data[0]
    assert list(fwd.x) == [4] and list(fwd.y) == ["0 · 3→3 / output"]
    cd = fwd.customdata[0]
    assert list(cd[:4]) == ["a", "forward", "0", "output"] and list(cd[6:9]) == [0, 3, 1]
    assert "NaN" in fwd.hovertemplate and "grad scale" in fwd.hovertemplate
    assert fig.data[1].marker.symbol != fwd.marker.symbol


def test_events_figure_without_events_says_so():
    fig = events_figure(_rec("a", events=False))
    assert len(fig.data) == 0 and "no NaN/Inf" in fig.layout.annotations[0].text


def test_memory_figure_stacks_components_per_run_and_layer():
    fig = memory_figure([_rec("a"), _rec("b")])
    assert fig.layout.barmode == "stack"
    assert [t.name for t in fig.data] == ["K", "C"]
    k = fig.data[0]
    assert [list(level) for level in k.x] == [
        ["a", "a", "b", "b"],
        ["0 · 3→3", "2 · 3→3", "0 · 3→3", "2 · 3→3"],
    ]
    assert list(k.y) == [100, 30, 100, 30] and list(fig.data[1].y) == [50, 0, 50, 0]


def test_memory_figure_never_repeats_a_component_colour_and_keeps_each_colour_stable():
    from diagnostics.views.style import COMPONENT_COLOURS, component_colours

    names = [*COMPONENT_COLOURS, "extra_one", "extra_two", "v", "w", "z"]
    rows = [{"step": 1, "layer": "1", "component": c, "bytes": 8} for c in names]
    fig = memory_figure(Recording(name="r", memory=frame_from_rows("memory", rows)))
    colours = [t.marker.color for t in fig.data]
    assert len(colours) == len(names) and len(set(colours)) == len(colours)
    again = component_colours(["extra_two", "A", "extra_one"])
    assert again["A"] == COMPONENT_COLOURS["A"]
    assert again == component_colours(["extra_one", "A", "extra_two"])  # order does not matter


def test_curves_figure_has_loss_and_accuracy_panels_with_one_line_per_run():
    fig = curves_figure([_rec("a"), _rec("b")])
    names = [(t.name, t.yaxis) for t in fig.data]
    assert names == [
        ("a (test acc 0.900)", "y"),
        ("a (test acc 0.900)", "y2"),
        ("b (test acc 0.900)", "y"),
        ("b (test acc 0.900)", "y2"),
        ("test accuracy", "y3"),  # the summaries' accuracies, one bar per run
    ]
    assert list(fig.data[1].y) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert list(fig.data[4].x) == ["a", "b"] and list(fig.data[4].y) == [0.9, 0.9]
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # below the plot


def test_curves_figure_starts_on_a_log_loss_axis_when_losses_span_over_3_decades():
    calm = _rec("calm")
    spike = _rec("spike")
    spike.steps.loc[2, "loss"] = 6e33
    assert curves_figure(calm).layout.yaxis.type == "linear"
    fig = curves_figure([calm, spike])
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.exponentformat == "power"
    menu = fig.layout.updatemenus[0]
    assert [b.args[0]["yaxis.type"] for b in menu.buttons] == ["linear", "log"]
    assert menu.active == 1
    assert curves_figure([calm, spike], log_loss=False).layout.yaxis.type == "linear"


def test_layer_labels_use_the_kinds_a_recording_carries():
    from diagnostics.views.style import layer_label, layer_labels

    rec = _rec("a")
    rec.meta["layers"] = [{"name": "0", "kind": "Linear 64→128"}]
    assert layer_labels(rec)["0"] == "0 · Linear 64→128"
    assert layer_label(rec, "2") == "2 · 3→3"  # no kind: the sizes of its factors
    rec.meta["layers"] = {"2": {"kind": "Conv2d", "in": 3, "out": 16}}
    assert layer_label(rec, "2") == "2 · Conv2d 3→16"
    assert spectrum_figure(rec).layout.updatemenus[0].buttons[2].label == "2 · Conv2d 3→16 · K"


def test_all_figures_accepts_a_recorder():
    import torch

    from diagnostics import Recorder

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(opt, model, every=1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    rec.step(loss=1.0)
    figs = all_figures(rec)
    # SGD has no symmetric factors with a damping: no eig_min figure
    assert set(figs) == {"curves", "condition", "spectrum", "events", "memory"}
    assert all(isinstance(f, go.Figure) for f in figs.values())


def test_all_figures_adds_eig_min_only_for_damped_symmetric_factors_marking_estimates():
    meta = {"optimizer": "KFAC"}
    rows = [
        ("1", "A", "eig_min", -0.2),
        ("1", "A", "cond_damped", 7.0),
        ("1", "A", "spectrum_estimated", 1.0),
        ("1", "(optimizer)", "damping", 0.1),
    ]
    figs = all_figures(_factor_rec("kfac", meta, rows))
    assert list(figs)[-1] == "eig_min"
    line, damping = figs["eig_min"].data
    assert list(line.y) == [-0.2, -0.2] and list(damping.y) == [-0.1, -0.1]
    assert set(line.marker.symbol) == {"circle-open"}


def test_save_figure_picks_the_format_from_the_suffix(tmp_path):
    fig = condition_figure(_rec("a"))
    html = save_figure(fig, tmp_path / "f.html").read_text()
    assert "<script src=" not in html and "Plotly.newPlot" in html
    data = json.loads(save_figure(fig, tmp_path / "f.json").read_text())
    assert len(data["data"]) == 4
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure(fig, tmp_path / "f.gif")


@pytest.mark.slow  # kaleido starts a headless Chromium: several seconds
def test_save_figure_writes_png_and_svg_via_kaleido(tmp_path):
    if shutil.which("chromium") is None and shutil.which("google-chrome") is None:
        pytest.skip("kaleido needs Chrome/Chromium, none installed here")
    fig = condition_figure(_rec("a"))
    assert save_figure(fig, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in save_figure(fig, tmp_path / "f.svg").read_bytes()[:500]


# ---------------------------------------------------------------------------- dashboard


def test_dashboard_controls_drive_the_figures():
    from diagnostics import dashboard

    d = dashboard([_rec("a"), _rec("b", cond_scale=10)])
    assert d.run.options == ("a", "b")
    assert d.layer.options == (("0 · 3→3", "0"), ("2 · 3→3", "2"))
    assert d.factor.options == ("K", "C")
    assert d.steps == [0, 2, 4] and d.step_slider.step == 2
    assert d.step_slider.value == 4  # starts at the last recorded step
    d.run.value, d.layer.value = "a", "0"
    d.step_slider.value = 2
    assert list(d.spectrum.data[0].y) == [12.0, 2.0, 1.0]
    assert d.condition.layout.shapes[0].x0 == 2 and d.curves.layout.shapes[0].x0 == 2
    d.run.value = "b"
    assert list(d.condition.data[0].y) == [40.0, 120.0, 200.0]
    d.factor.value = "C"
    assert "C · 0 · 3→3" in d.spectrum.layout.title.text
    assert [t.name for t in d.events.data] == ["forward", "backward"]
    assert len(d.curves.data) == 2


def test_dashboard_opens_on_the_first_failing_factor_else_the_worst_conditioned():
    from diagnostics import dashboard

    calm, worse = _rec("calm", events=False), _rec("worse", events=False, cond_scale=10)
    d = dashboard([calm, worse])
    assert (d.run.value, d.layer.value, d.factor.value) == ("worse", "0", "K")
    failing = _rec("failing")  # its first event is at step 3 in layer 2
    d = dashboard([worse, failing])
    assert (d.run.value, d.layer.value) == ("failing", "2")


def test_dashboard_snaps_a_typed_step_to_the_nearest_recorded_step():
    from diagnostics import dashboard

    d = dashboard(_rec("a"))
    d.step_slider.value = 3  # typed into the slider's box: not a recorded step
    assert d.step_slider.value == 2
    assert list(d.spectrum.data[0].y) == [12.0, 2.0, 1.0]  # the spectrum at step 2, not blank
    d.step_slider.value = 99
    assert d.step_slider.value == 4


def test_dashboard_fits_a_1400_px_jupyterlab_without_cutting_off_figures():
    import ipywidgets as widgets

    from diagnostics import dashboard
    from diagnostics.views.dashboard import FIGURE_WIDTH

    d = dashboard(_rec("a"))
    figs = [d.spectrum, d.condition, d.curves, d.events, d.memory]
    assert isinstance(d.figures, widgets.GridBox) and list(d.figures.children) == figs
    # every figure has a fixed width that fits twice (with gaps) in the ~1280 px output area
    # of a 1400 px JupyterLab; a narrower page gets one figure per row (auto-fill grid)
    assert all(f.layout.width == FIGURE_WIDTH for f in figs)
    assert 2 * (FIGURE_WIDTH + 10) + 4 <= 1280
    assert "auto-fill" in d.figures.layout.grid_template_columns


def test_live_dashboard_redraws_after_each_recorded_step():
    import torch
    import torch.nn.functional as F

    from diagnostics import Recorder, dashboard
    from singd import SINGD

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = SINGD(model, lr=0.05, T=1)
    rec = Recorder(opt, model, every=2)
    d = dashboard(rec, live=True, min_interval=0.0)
    assert d.factor.options == ("(none)",)  # nothing recorded yet
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        rec.step(loss=loss)
    assert d.steps == [0, 2, 4] and d.step_slider.value == 4  # follows
    assert [v for _, v in d.layer.options] == ["0", "2"] and d.factor.options == ("K", "C")
    assert len(d.spectrum.data[0].y) == 5  # K of layer 0: 4 inputs + bias
    assert list(d.curves.data[0].x) == [0, 1, 2, 3, 4]
    d.close_live()
    rec.step(loss=1.0)
    rec.step(loss=1.0)
    assert d.steps == [0, 2, 4]


def test_throttled_live_dashboard_still_shows_the_final_state_after_close():
    import torch

    from diagnostics import Recorder, dashboard

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(opt, model, every=1) as rec:
        d = dashboard(rec, live=True, min_interval=3600.0)
        for _ in range(4):
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
            rec.step(loss=1.0)
        assert list(d.curves.data[0].x) == []  # throttled: nothing redrawn yet
    assert list(d.curves.data[0].x) == [0, 1, 2, 3]  # close() redrew the final state


def test_live_dashboard_needs_a_recorder():
    from diagnostics import dashboard

    with pytest.raises(ValueError, match="Recorder"):
        dashboard(_rec("a"), live=True)
    with pytest.raises(TypeError, match="Recording"):
        dashboard("not a recording")


def test_spectrum_figure_stores_values_rounded_to_what_it_can_show():
    from diagnostics.record.recording import Recording, frame_from_rows
    from diagnostics.views.figures import spectrum_figure

    rows = [
        {"step": s, "layer": "0", "factor": "K", "index": i, "value": (i + 1) / 3 * 10.0**-i}
        for s in range(3)
        for i in range(4)
    ]
    fig = spectrum_figure(Recording(name="r", spectra=frame_from_rows("spectra", rows)))
    hm = fig.data[0]
    assert [row[0] for row in hm.customdata] == [0.33333, 0.066667, 0.01, 0.0013333]
    assert hm.customdata[0][0] == 0.33333  # 5 significant digits, not 17
    assert all(len(repr(v)) <= 7 for row in hm.z for v in row)  # log10 to 4 decimals
