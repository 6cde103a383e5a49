"""Notebook 03 in a real JupyterLab: Run All in chromium, then the live dashboard works.

A ``jupyter lab`` server is started on a free local port with a random token and all of
its configuration, data, runtime, settings and workspace folders under the test's
temporary folder (the user's own Jupyter setup is never read or written). It serves a
copy of notebook 03 whose parameters cell is edited to a few training steps. The server
is always stopped, also when a test fails.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "03_half_precision_stability.ipynb"
JUPYTER = Path(sys.executable).with_name("jupyter")

# tiny values for the parameters cell of the copy: one SINGD run in bfloat16, 6 steps
TINY = {
    "optimizers": ["singd"],
    "structures": ["diagonal", "dense"],
    "compare_fp32": False,
    "steps": 6,
    "record_every": 2,
    "min_accuracy": 0.0,
    "out_dir": "out",
}

# settings of the temporary JupyterLab: no news/update checks (no network), every cell kept
# in the DOM (no windowing) so that off-screen outputs are rendered
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}  # fmt: skip

IDLE_JS = "() => /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar').innerText)"
# every code cell has run (no "[*]" left) and the kernel is idle again
DONE_JS = """() => {
    const p = Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))
                   .map(e => e.textContent);
    const idle = /\\|\\s*Idle/.test(document.querySelector('#jp-main-statusbar').innerText);
    return p.length > 0 && !p.some(t => t.includes('*')) && idle;
}"""


def tiny_copy(source: Path, dest: Path, values: dict[str, Any]) -> Path:
    """Copy a notebook, rewriting the assignments in its ``parameters`` cell to ``values``.

    Every name in ``values`` must already be a parameter (so a renamed parameter fails
    here, loudly, instead of being ignored).
    """
    nb = nbformat.read(source, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{source.name} needs exactly one cell tagged 'parameters'"
    cell = cells[0]
    lines = cell.source.splitlines()
    found: dict[str, ast.AnnAssign] = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    missing = sorted(set(values) - set(found))
    assert not missing, f"not parameters of {source.name}: {missing} (have {sorted(found)})"
    # replace from the bottom so earlier line numbers stay valid
    for name in sorted(values, key=lambda n: -found[n].lineno):
        node = found[name]
        annotation = ast.get_source_segment(cell.source, node.annotation)
        new = f"{name}: {annotation} = {values[name]!r}  # tiny value for the browser test"
        lines[node.lineno - 1 : node.end_lineno] = [new]
    cell.source = "\n".join(lines)
    for c in nb.cells:  # a clean notebook: no stale outputs to confuse the checks
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


@dataclass
class LabServer:
    """A running ``jupyter lab``: its base URL, token, served folder and log file."""

    url: str
    token: str
    root: Path
    log: Path

    def lab_url(self, path: str) -> str:
        """URL that opens ``path`` (relative to the root) in JupyterLab."""
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server log (for failure messages)."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server: SIGTERM (it shuts its kernels down), then SIGKILL its group."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, nothing else
        proc.wait(timeout=10)


@contextlib.contextmanager
def serve_lab(
    notebook: Path, tiny: dict[str, Any], base: Path, wait: float = 90
) -> Iterator[LabServer]:
    """A ``jupyter lab`` on a free local port with a random token, serving a copy of
    ``notebook`` with the parameters ``tiny``, every Jupyter folder under ``base``; the
    server is stopped on exit, also when a test fails."""
    if not JUPYTER.exists():
        pytest.fail(f"{JUPYTER} not found: install the project with the notebooks extra")
    root = base / "root"
    tiny_copy(notebook, root / notebook.name, tiny)
    for plugin, values in LAB_SETTINGS.items():
        path = base / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(base / "config"),
        JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(base / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("JUPYTER_PATH", None)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [
        str(JUPYTER), "lab", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
        "--no-browser", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    log = base / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = LabServer(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer in {wait:g} s:\n{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def lab_server(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A JupyterLab serving a tiny copy of notebook 03, with every Jupyter folder in tmp."""
    with serve_lab(NOTEBOOK, TINY, tmp_path_factory.mktemp("jupyterlab")) as server:
        yield server


def _dashboard_state(output: Any) -> dict[str, Any]:
    """The dashboard's spectrum figure as drawn: title text and the first trace's data."""
    return output.evaluate(
        """el => {
            const plots = Array.from(el.querySelectorAll('.js-plotly-plot'));
            const spec = plots.find(p => (p.querySelector('.gtitle') || {}).textContent
                                         && p.querySelector('.gtitle').textContent
                                              .startsWith('Spectrum'));
            if (!spec) return null;
            const t = spec.data[0];
            return {title: spec.querySelector('.gtitle').textContent,
                    x: Array.from(t.x || []), y: Array.from(t.y || []),
                    points: spec.querySelectorAll('.scatterlayer .point').length};
        }"""
    )


def run_all_cells(page: Any, url: str, start_ms: int, run_ms: int) -> None:
    """Open the notebook at ``url``, wait for an idle kernel, run every cell from the Run menu
    as a person would, and assert that every cell ran and none wrote a traceback."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=start_ms)
    page.wait_for_function(IDLE_JS, timeout=start_ms)  # kernel started and idle
    page.locator("#jp-menu-panel .lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
    page.wait_for_function(DONE_JS, timeout=run_ms)
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_text_contents()
    errors = page.locator(
        ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
    ).all_text_contents()
    tracebacks = [e for e in errors if "Traceback" in e or "Error" in e]
    assert all(p.strip().startswith("[") and p.strip()[1:-2].isdigit() for p in prompts), (
        f"not every cell ran: {prompts}\n" + "\n".join(tracebacks)
    )
    assert tracebacks == []


def test_notebook_03_runs_in_jupyterlab_and_its_dashboard_answers_the_layer_dropdown(
    lab_server, watched_page, tmp_path
):
    host = lab_server.url
    w = watched_page(allow=(host + "/",), viewport={"width": 1500, "height": 1000})
    page = w.page
    try:
        run_all_cells(page, lab_server.lab_url(NOTEBOOK.name), start_ms=60_000, run_ms=120_000)

        # the dashboard: ipywidgets controls and plotly FigureWidgets inside one output
        dash = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-dropdown"))
        assert dash.count() == 1, (
            f"expected one dashboard output (ipywidgets dropdowns) in {NOTEBOOK.name}, "
            f"found {dash.count()}"
        )
        dash = dash.first
        dash.locator(".main-svg").first.wait_for(state="attached", timeout=60_000)
        assert dash.locator(".jupyter-widgets").count() >= 5
        assert dash.locator(".widget-dropdown").count() == 3  # run, layer, factor
        assert dash.locator(".widget-slider, .widget-hslider").count() >= 1
        assert dash.locator(".js-plotly-plot").count() >= 4
        page.wait_for_function(
            "el => el.querySelectorAll('.js-plotly-plot .main-svg').length >= 8",
            arg=dash.element_handle(),
            timeout=30_000,
        )
        before = _dashboard_state(dash)
        assert before is not None and before["points"] > 0, before

        layer = dash.locator(".widget-dropdown").filter(has_text="layer").locator("select")
        options = layer.locator("option").all_text_contents()
        current = layer.evaluate("s => s.options[s.selectedIndex].text").replace("\xa0", " ")
        options = [o.replace("\xa0", " ") for o in options]  # ipywidgets writes nbsp
        assert len(options) >= 2, f"layer dropdown offers {options}"
        target = next(o for o in options if o != current)
        assert f"· {current} at step" in before["title"]  # labels: "1 · Linear 64→128"
        # a real kernel round trip: the browser changes the widget, Python redraws the figure
        layer.select_option(index=options.index(target))
        page.wait_for_function(
            """([el, t]) => Array.from(el.querySelectorAll('.gtitle'))
                                  .some(g => g.textContent.includes(t))""",
            arg=[dash.element_handle(), f"· {target} at step"],
            timeout=30_000,
        )
        after = _dashboard_state(dash)
        assert f"· {target} at step" in after["title"] and after["title"] != before["title"]
        assert (after["x"], after["y"]) != (before["x"], before["y"])
        assert after["points"] > 0

        dash.evaluate("el => el.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(tmp_path / "dashboard.png"))
        assert w.errors == []  # console errors and uncaught page errors
        assert w.blocked == [], f"JupyterLab tried to reach the network: {w.blocked}"
        assert all(u.startswith(host) for u in w.requests)
        assert all(u.startswith(host.replace("http", "ws", 1)) for u in w.websockets)
    except BaseException:
        page.screenshot(path=str(tmp_path / "jupyterlab-failure.png"))
        print(f"server log tail:\n{lab_server.log_tail()}")
        raise
