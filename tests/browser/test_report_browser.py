"""The HTML report of a real (short) SINGD run, opened offline in headless chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diagnostics.views.report import report
from experiments.training import train

pytestmark = pytest.mark.browser

# every figure of the report, in order (report.py names the divs fig-<key>-<index>)
FIGURE_KEYS = ["curves", "condition", "spectrum", "events", "memory"]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of 6 steps of the digits MLP with SINGD, recorder on (every 2nd step)."""
    threads = torch.get_num_threads()
    try:
        result = train(
            "mlp", "singd", steps=6, record=True, record_every=2, progress=False, num_threads=1
        )
    finally:
        torch.set_num_threads(threads)
    assert result.recording is not None and len(result.recording.spectra) > 0
    return report(result.recording, tmp_path_factory.mktemp("report") / "report.html")


def _open(watched_page: Any, path: Path) -> Any:
    """Open the report in a page that may only read file:// URLs; wait for every figure."""
    w = watched_page(allow=("file://",))
    w.page.goto(path.as_uri(), wait_until="load")
    w.page.wait_for_function(
        "n => document.querySelectorAll('.plotly-graph-div .main-svg').length >= n",
        arg=len(FIGURE_KEYS),
        timeout=30_000,
    )
    return w


def _visible_trace(page: Any, div_id: str) -> dict[str, Any]:
    """Name, z data and the rendered heatmap image of the visible trace of a figure div."""
    return page.evaluate(
        """id => {
            const gd = document.getElementById(id);
            const shown = gd.data.filter(t => t.visible === undefined || t.visible === true);
            const img = gd.querySelector('.hm image');
            return {n_visible: shown.length, name: shown.map(t => t.name).join('|'),
                    z: JSON.stringify(shown.map(t => t.z)),
                    title: gd.querySelector('.gtitle') ? gd.querySelector('.gtitle').textContent
                                                       : null,
                    image: img ? img.getAttribute('href') : null};
        }""",
        div_id,
    )


def test_report_renders_every_figure_offline_without_errors(watched_page, report_path, tmp_path):
    w = _open(watched_page, report_path)
    page = w.page
    figures = page.evaluate(
        """() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(d => ({
            id: d.id, svgs: d.querySelectorAll('.main-svg').length,
            traces: (d.data || []).length,
            height: d.getBoundingClientRect().height}))"""
    )
    assert [f["id"] for f in figures] == [f"fig-{k}-{i}" for i, k in enumerate(FIGURE_KEYS)]
    for f in figures:
        assert f["svgs"] >= 1, f"figure {f['id']} was not drawn by plotly: {f}"
        assert f["height"] > 100, f"figure {f['id']} has no height: {f}"
    by_id = {f["id"]: f for f in figures}
    # a real run: loss curve, 3 layers x 2 factors of condition numbers and spectra, memory bars
    assert by_id["fig-curves-0"]["traces"] >= 1
    assert by_id["fig-condition-1"]["traces"] == 6
    assert by_id["fig-spectrum-2"]["traces"] == 6
    assert by_id["fig-memory-4"]["traces"] >= 2
    # drawn data, not just empty axes
    assert page.locator("#fig-curves-0 .scatterlayer path.js-line").count() >= 1
    assert page.locator("#fig-spectrum-2 .hm image").count() == 1
    assert page.locator("#fig-memory-4 .barlayer .point").count() >= 3

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000

    assert w.errors == []
    assert w.blocked == []
    assert w.requests and all(u.startswith("file://") for u in w.requests), w.requests
    assert w.websockets == []


def test_report_layer_dropdown_changes_the_plotted_spectrum(watched_page, report_path, png_colours):
    w = _open(watched_page, report_path)
    page = w.page
    fig = page.locator("#fig-spectrum-2")
    before = _visible_trace(page, "fig-spectrum-2")
    assert before["n_visible"] == 1 and before["image"]
    layer_before = before["name"].split(" · ")[1]

    fig.locator(".updatemenu-header").click()
    buttons = fig.locator(".updatemenu-dropdown-button")
    buttons.first.wait_for(state="visible")
    labels = buttons.locator(".updatemenu-item-text").all_text_contents()
    assert len(labels) == 6, labels
    target = next(i for i, lab in enumerate(labels) if not lab.startswith(f"{layer_before} ·"))
    buttons.nth(target).click()
    page.wait_for_function(
        "t => document.querySelector('#fig-spectrum-2 .gtitle').textContent !== t",
        arg=before["title"],
        timeout=10_000,
    )
    after = _visible_trace(page, "fig-spectrum-2")

    assert after["n_visible"] == 1
    assert labels[target] in after["title"]
    assert after["name"] != before["name"]
    assert after["name"].split(" · ")[1] != layer_before
    assert after["z"] != before["z"]
    assert after["image"] and after["image"] != before["image"]  # the redrawn heatmap

    # the redrawn figure shows a real heatmap: many colours, not a blank area
    (height, width), n_colours = png_colours(fig.screenshot())
    assert height > 200 and width > 300
    assert n_colours > 50
    assert w.errors == [] and w.blocked == []
