"""The Studio as a user meets it: JupyterLab on loopback, 05_studio opened in headless Chromium (Debian's, driven
by Playwright), all cells run, Estimate and Train clicked, the live figure watched until it has every step.

Saves docs/img/studio.png (the README's picture; $SLOTHBOOK_SCREENSHOT_DIR puts it elsewhere). Skips when
/usr/bin/chromium, playwright or jupyterlab is missing: no browser is ever downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ui.kernel import KERNEL_ENV

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
STEPS = 3  # the panel's Train button runs this many steps (the notebook's own cells run theirs first)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # the waits below add up to less; a hang ends here with a stack dump
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                       "(apt-get install chromium); no browser is downloaded"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {seconds} s")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 (random port, token) serving a copy of 05_studio.ipynb."""
    pytest.importorskip("jupyterlab", reason="needs jupyterlab (pip install jupyterlab)")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "05_studio.ipynb", root)
    config = tmp_path / "config"
    (config / "labconfig").mkdir(parents=True)
    # No "would you like news?" toast over the screenshot (and no request for news).
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), **KERNEL_ENV}
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False",
         "--LabApp.extension_manager=readonly", "--allow-root"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(f"{base}/api/status?token={token}", 120, proc)
        yield f"{base}/lab/tree/05_studio.ipynb?token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print((tmp_path / "lab.log").read_text()[-3000:])


def _accept_kernel(page, sync_api) -> None:
    """JupyterLab may ask which kernel to start for the notebook: keep the one it proposes (its own python3)."""
    try:
        page.locator(".jp-Dialog button", has_text="Select").click(timeout=20_000)
    except sync_api.TimeoutError:
        pass  # no dialog: the kernel started on its own


def _steps_drawn(panel) -> int:
    """Steps the panel's live memory figure shows: the x values of its "base weights" trace."""
    return panel.evaluate("""el => Math.max(0, ...[...el.querySelectorAll('.js-plotly-plot')].flatMap(
        g => (g.data || []).filter(t => t.name === 'base weights').map(t => (t.x || []).length)))""")


def test_studio_in_jupyterlab(lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    out_dir = Path(os.environ.get("SLOTHBOOK_SCREENSHOT_DIR", ROOT / "docs" / "img"))
    out_dir.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1800})
            page.goto(lab, timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            _accept_kernel(page, sync_api)

            # Run > Run All Cells: the notebook's own cells show the panel, then estimate, train and export.
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
            panel = page.locator(".jp-OutputArea-output").filter(has_text="slothbook Studio").first
            panel.wait_for(timeout=300_000)
            status = panel.locator(".slothbook-ok", has_text="exported gguf")
            status.first.wait_for(timeout=900_000)  # the last cell's export
            assert "Traceback" not in page.locator(".jp-Notebook").inner_text()

            # Now as a user: a shorter run set in the panel's own field, then its buttons.
            steps_box = panel.locator(".widget-inline-hbox:has(> label:text-is('steps')) input")
            steps_box.fill(str(STEPS))
            steps_box.press("Enter")
            panel.get_by_role("button", name="Estimate").click()
            panel.locator(".slothbook-ok, .slothbook-warning").filter(has_text="Estimate").first.wait_for(
                timeout=120_000)
            assert panel.locator(".slothbook-ok, .slothbook-warning").filter(has_text="predicted peak").count() > 0

            panel.get_by_role("button", name="Train").click()
            panel.locator(".slothbook-ok", has_text=f"{STEPS} steps: loss").first.wait_for(timeout=600_000)
            assert _steps_drawn(panel) == STEPS  # the live figure redrew as each step finished
            assert "Traceback" not in panel.inner_text()
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(out_dir / "studio.png"))
        finally:
            browser.close()
    assert (out_dir / "studio.png").stat().st_size > 20_000
