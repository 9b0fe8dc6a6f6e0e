"""A real browser: JupyterLab on 127.0.0.1, Debian's chromium driven by playwright, the quickstart run in it.

Checks what a user sees: every cell ran without an error, the memwatch lines are
there, and the backtest plot was *drawn* (a canvas with pixels), not left at
"Loading BokehJS ...". A screenshot goes to tests/artifacts/ (git-ignored).
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "tests" / "artifacts"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
# The flags a headless chromium needs here: no sandbox as root, no GPU, and nothing that phones home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path, lab_home):
    root = tmp_path / "nb"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "00_quickstart.ipynb", root)
    port, token = _free_port(), secrets.token_hex(16)
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate", "--ServerApp.disable_check_xsrf=False"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            time.sleep(0.3)
    try:
        yield url, token
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()


_CELLS_JS = """() => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  const cells = [];
  for (let i = 0; i < nb.model.cells.length; i++) {
    const c = nb.model.cells.get(i).toJSON();
    cells.push({type: c.cell_type, count: c.execution_count ?? null, tags: (c.metadata || {}).tags || [],
                outputs: (c.outputs || []).map(o => ({type: o.output_type, ename: o.ename || null,
                                                      evalue: o.evalue || null}))});
  }
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel;
  return {cells, status: kernel ? kernel.status : 'none'};
}"""

_DRAWN_JS = """(canvas) => {
  const ctx = canvas.getContext('2d');
  if (!ctx || !canvas.width || !canvas.height) return 0;
  const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < d.length; i += 4 * 7) {   // a sample of the pixels is enough
    if (d[i + 3] > 0 && (d[i] < 240 || d[i + 1] < 240 || d[i + 2] < 240)) coloured++;
  }
  return coloured;
}"""


@pytest.mark.timeout(420)
def test_quickstart_in_jupyterlab_draws_the_plot(jupyterlab):
    from playwright.sync_api import sync_playwright

    url, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/00_quickstart.ipynb?token={token}", timeout=90_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel?.status "
                                   "=== 'idle'", timeout=90_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # Done when every code cell has an execution count and the kernel is idle again.
            page.wait_for_function(f"() => {{ const s = ({_CELLS_JS})(); return s.status === 'idle' && "
                                   "s.cells.filter(c => c.type === 'code').every(c => c.count !== null); }",
                                   timeout=300_000, polling=1000)
            state = page.evaluate(_CELLS_JS)
            errors = [o for c in state["cells"] for o in c["outputs"] if o["type"] == "error"]
            assert not errors, errors
            body = page.locator("body").inner_text()
            assert "[memwatch" in body, "no memwatch line in the page"
            plot = page.locator(".moondev-plot").first
            plot.scroll_into_view_if_needed()
            page.wait_for_function("() => !document.body.innerText.includes('Loading BokehJS')", timeout=30_000)
            canvases = plot.locator("canvas")  # bokeh draws in shadow roots; playwright's CSS pierces them
            canvases.first.wait_for(state="attached", timeout=60_000)
            drawn = max(canvases.nth(i).evaluate(_DRAWN_JS) for i in range(canvases.count()))
            page.screenshot(path=str(ARTIFACTS / "quickstart-plot.png"))
            plot.screenshot(path=str(ARTIFACTS / "quickstart-backtest-plot.png"))
            assert drawn > 100, f"the backtest plot's canvases are blank ({canvases.count()} canvases)"
        finally:
            browser.close()
