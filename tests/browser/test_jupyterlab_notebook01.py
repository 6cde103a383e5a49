"""Notebook 01 in a real JupyterLab: Run All in chromium, then the SINGD section shows its output.

The same set-up as ``test_jupyterlab.py`` (whose helpers are reused): a ``jupyter lab`` on a
free local port with a random token, every Jupyter folder under the test's temporary folder,
serving a copy of notebook 01 with small parameters (the ones ``test_notebook_runs.py`` checks),
so that Run All takes a few seconds. The server is always stopped, also when a test fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_jupyterlab import (
    REPO,
    LabServer,
    run_all_cells,
    serve_lab,
)

pytestmark = pytest.mark.browser

NOTEBOOK = REPO / "notebooks" / "01_natural_gradient.ipynb"
# small values for the parameters cell of the copy (claims checked in test_notebook_runs.py)
TINY = {
    "n_classes": 3,
    "n_features": 5,
    "steps": 15,
    "damping": 1e-2,
    "lr_cov": 0.3,
    "ikfac_steps": 120,
    "tolerance": 1e-4,
    "min_ratio": 3.0,
    "singd_lr": 1.0,
    "singd_lr_cov": 0.5,
    "singd_alpha1": 0.3,
    "structures": ["dense", "diagonal"],
}
HEADING = "5 · SINGD proper"
FIGURE_TITLE = "SINGD's factors reach their fixed point"
LOSS_TITLE = "training loss: IKFAC and SINGD"
MARKER = "SINGD's K K^T and C C^T reach their damped inverses from products alone: True"

# after the SINGD heading (a rendered markdown cell): the cells' figure titles and printed text
SECTION_JS = """heading => {
    const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'));
    const at = cells.findIndex(c => c.classList.contains('jp-MarkdownCell')
                                    && (c.querySelector('h2') || {}).textContent
                                    && c.querySelector('h2').textContent.includes(heading));
    if (at < 0) return null;
    const after = cells.slice(at + 1);
    return {
        heading_index: at,
        titles: after.flatMap(c => Array.from(c.querySelectorAll('.js-plotly-plot .gtitle'))
                                         .map(g => g.textContent)),
        text: after.map(c => Array.from(c.querySelectorAll(
                  ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stdout']"))
                  .map(o => o.textContent).join('\\n')).join('\\n'),
    };
}"""


@pytest.fixture(scope="module")
def lab_01(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A JupyterLab serving a small copy of notebook 01, with every Jupyter folder in tmp."""
    with serve_lab(NOTEBOOK, TINY, tmp_path_factory.mktemp("jupyterlab01"), wait=60) as server:
        yield server


def test_notebook_01_runs_all_in_jupyterlab_and_shows_the_singd_section(
    lab_01, watched_page, tmp_path: Path
):
    host = lab_01.url
    w = watched_page(allow=(host + "/",), viewport={"width": 1500, "height": 1000})
    page = w.page
    try:
        run_all_cells(page, lab_01.lab_url(NOTEBOOK.name), start_ms=45_000, run_ms=60_000)

        # under the SINGD heading: its fixed-point figure, the loss plot and the claim's text
        page.wait_for_function(
            f"() => ({SECTION_JS})({json.dumps(HEADING)}) && "
            f"({SECTION_JS})({json.dumps(HEADING)}).titles.some(t => t.startsWith("
            f"{json.dumps(FIGURE_TITLE)}))",
            timeout=20_000,
        )
        section = page.evaluate(f"({SECTION_JS})", HEADING)
        assert section is not None, f"no rendered heading {HEADING!r}"
        assert any(t.startswith(FIGURE_TITLE) for t in section["titles"]), section["titles"]
        assert any(t.startswith(LOSS_TITLE) for t in section["titles"]), section["titles"]
        assert MARKER in section["text"], section["text"][-2000:]
        assert "IKFAC ends at least 3x below GD: True" in section["text"]

        page.locator(".jp-MarkdownCell h2", has_text=HEADING).first.scroll_into_view_if_needed()
        page.screenshot(path=str(tmp_path / "singd-section.png"))
        assert w.errors == []  # console errors and uncaught page errors
        assert w.blocked == [], f"JupyterLab tried to reach the network: {w.blocked}"
        assert all(u.startswith(host) for u in w.requests)
    except BaseException:
        page.screenshot(path=str(tmp_path / "jupyterlab-failure.png"))
        print(f"server log tail:\n{lab_01.log_tail()}")
        raise
