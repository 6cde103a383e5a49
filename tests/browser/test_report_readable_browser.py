"""What a reader sees in the report, measured in headless chromium: one run's condition numbers
at a time, distinct memory colours, and a summary table that fits a 1400 px screen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from diagnostics.record.recording import Recording, frame_from_rows
from diagnostics.views.report import report

pytestmark = pytest.mark.browser

KFAC_STATE = ("A", "G", "A_inv", "G_inv", "A_upcast", "G_upcast", "momentum")
SINGD_STATE = ("K", "C", "m_K", "m_C", "momentum")
ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _run(name: str, factors: tuple[str, ...], state: tuple[str, ...], meta: dict) -> Recording:
    """Three layers, ten recorded steps, the given factors' spectra summaries and state parts."""
    steps = frame_from_rows(
        "steps", [{"step": s, "recorded": True, "loss": 2.0 / (s + 1), "step_time_s": 0.002}
                  for s in range(10)],
    )  # fmt: skip
    metrics = []
    for s in range(10):
        for i, layer in enumerate(("1", "3", "5")):
            for f in factors:
                lo, hi = (0.0, 10.0**i) if f in ("A", "G") else (1.0, 2.0 + s)
                metrics += [{"step": s, "layer": layer, "factor": f, "metric": m, "value": v}
                            for m, v in (("eig_min", lo), ("eig_max", hi),
                                         ("cond", hi / lo if lo else float("inf")))]  # fmt: skip
            metrics.append({"step": s, "layer": layer, "factor": "weight.exp_avg_sq",
                            "metric": "cond", "value": 1e5})  # fmt: skip
    memory = [{"step": 9, "layer": ly, "component": c, "bytes": 1024 * (k + 1)}
              for ly in ("1", "3", "5") for k, c in enumerate(state)]  # fmt: skip
    summary = {"test_accuracy": 0.9, "val_accuracy": 0.91, "train_accuracy": 0.95,
               "why": "a sentence that explains what happened to this run " * 4}  # fmt: skip
    summary.update({f"number_{i}": float(i) for i in range(16)})  # a harness's many columns
    return Recording(
        name=name,
        steps=steps,
        metrics=frame_from_rows("metrics", metrics),
        memory=frame_from_rows("memory", memory),
        meta=meta,
        summary=summary,
    )


@pytest.fixture(scope="module")
def readable_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kfac_meta = {"optimizer": "KFAC", "hyperparameters": [{"damping": 0.1}]}
    recs = [
        _run("kfac-fp32-with-a-long-descriptive-run-name", ("A", "G"), KFAC_STATE, kfac_meta),
        _run("singd-bf16", ("K", "C"), SINGD_STATE, {"optimizer": "SINGD"}),
        _run("adamw-bf16", (), ADAM_STATE, {"optimizer": "AdamW"}),
    ]
    return report(recs, tmp_path_factory.mktemp("readable") / "report.html")


def _open(watched_page: Any, path: Path) -> Any:
    w = watched_page(allow=("file://",), viewport={"width": 1400, "height": 900})
    w.page.goto(path.as_uri(), wait_until="load")
    w.page.wait_for_function(
        "() => document.querySelectorAll('.plotly-graph-div .main-svg').length >= 5",
        timeout=30_000,
    )
    return w


_CONDITION = """() => {
    const gd = document.querySelector('[id^="fig-condition-"]');
    const shown = gd.data.filter(t => t.visible === undefined || t.visible === true);
    return {runs: [...new Set(shown.map(t => t.legendgroup))], n: shown.length,
            drawn: gd.querySelectorAll('.scatterlayer .trace').length,
            title: gd.querySelector('.gtitle').textContent};
}"""


def test_condition_figure_shows_one_run_with_a_handful_of_lines(watched_page, readable_report):
    w = _open(watched_page, readable_report)
    page = w.page
    before = page.evaluate(_CONDITION)
    assert len(before["runs"]) == 1 and 1 <= before["n"] <= 6, before
    assert before["drawn"] <= 6, before  # what the browser actually drew

    fig = page.locator('[id^="fig-condition-"]')
    fig.locator(".updatemenu-header").click()
    buttons = fig.locator(".updatemenu-dropdown-button")
    buttons.first.wait_for(state="visible")
    labels = buttons.locator(".updatemenu-item-text").all_text_contents()
    assert labels == ["kfac-fp32-with-a-long-descriptive-run-name", "singd-bf16"]  # no adamw
    buttons.nth(1).click()
    page.wait_for_function(
        "t => document.querySelector('[id^=\"fig-condition-\"] .gtitle').textContent !== t",
        arg=before["title"],
        timeout=10_000,
    )
    after = page.evaluate(_CONDITION)
    assert after["runs"] == ["singd-bf16"] and after["n"] <= 6, after
    assert w.errors == []


def test_memory_figure_colours_every_component_differently(watched_page, readable_report):
    w = _open(watched_page, readable_report)
    colours = w.page.evaluate(
        """() => Array.from(document.querySelectorAll('[id^="fig-memory-"] .legend .traces'))
            .map(g => [g.textContent, g.querySelector('.legendpoints path').style.fill])"""
    )
    names = [n for n, _ in colours]
    assert sorted(names) == sorted({*KFAC_STATE, *SINGD_STATE, *ADAM_STATE}), colours
    assert len({c for _, c in colours}) == len(colours), colours


def test_summary_table_fits_a_1400_px_window(watched_page, readable_report):
    w = _open(watched_page, readable_report)
    m = w.page.evaluate(
        """() => {
            const t = document.querySelector('table.summary');
            const wrap = t.parentElement;
            return {right: t.getBoundingClientRect().right, width: t.scrollWidth,
                    wrap: wrap.clientWidth, view: document.documentElement.clientWidth,
                    folded: !document.querySelector('details.more').open};
        }"""
    )
    assert m["right"] <= 1400 and m["width"] <= m["wrap"] <= m["view"], m  # no scrolling
    assert m["folded"], m  # the other numbers wait behind a click
