"""The report's layout in headless chromium: figures span the page, the table never overflows."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnostics.record.recording import Recording, frame_from_rows
from diagnostics.views.report import report

pytestmark = pytest.mark.browser


def _recording(name: str, error: str = "") -> Recording:
    """A small recording with spectra and memory; ``error`` set makes it a failed run."""
    steps = frame_from_rows(
        "steps",
        [{"step": s, "recorded": True, "loss": 2.0 / (s + 1), "step_time_s": 0.003}
         for s in range(6)],
    )  # fmt: skip
    spectra = frame_from_rows(
        "spectra",
        [{"step": s, "layer": "0", "factor": "K", "index": i, "value": 1.0 + i}
         for s in range(0, 6, 2) for i in range(4)],
    )  # fmt: skip
    memory = frame_from_rows("memory", [{"step": 5, "layer": "0", "component": "K", "bytes": 64}])
    summary = {"test_accuracy": 0.9, "workload": "mlp", "optimizer": "kfac", "lr": 0.01}
    if error:
        summary["error"] = error
    return Recording(name=name, steps=steps, spectra=spectra, memory=memory, summary=summary)


@pytest.fixture(scope="module")
def layout_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    long_error = "step 3: KFACInverseError: " + "the factor A of layer 0 is not invertible " * 12
    recs = {
        "a-run-with-a-rather-long-name-singd-bfloat16-hierarchical15_15": _recording("a"),
        "failed": _recording("b", error=long_error),
    }
    return report(recs, tmp_path_factory.mktemp("layout") / "report.html")


@pytest.mark.parametrize("width", [1400, 900])
def test_report_figures_fill_the_width_and_nothing_overflows_the_page(
    watched_page, layout_report, width
):
    w = watched_page(allow=("file://",), viewport={"width": width, "height": 900})
    page = w.page
    page.goto(layout_report.as_uri(), wait_until="load")
    page.wait_for_function(
        "() => document.querySelectorAll('.plotly-graph-div .main-svg').length >= 5",
        timeout=30_000,
    )
    page.wait_for_timeout(300)  # responsive relayout after load
    m = page.evaluate(
        """() => ({
            page: document.documentElement.scrollWidth, view: document.documentElement.clientWidth,
            body: document.body.clientWidth,
            figs: Array.from(document.querySelectorAll('.plotly-graph-div')).map(
                d => d.querySelector('.main-svg').getBoundingClientRect().width),
            wrap: document.querySelector('.table-wrap').getBoundingClientRect().right,
            why: Math.max(...Array.from(document.querySelectorAll('td.text')).map(
                td => td.textContent.includes('KFACInverseError')
                    ? td.getBoundingClientRect().height : 0))})"""
    )
    # no horizontal page scroll: the wide table scrolls inside its own box
    assert m["page"] <= m["view"], m
    assert m["wrap"] <= m["view"], m
    # every figure is drawn across (nearly) the full content width
    assert all(f >= 0.95 * (m["body"] - 4) for f in m["figs"]), m
    # the long reason wraps onto several lines instead of widening the table
    assert m["why"] > 40, m
    assert w.errors == []
