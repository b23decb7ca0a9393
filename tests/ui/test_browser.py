"""A real browser on a real server: `quantlab ui` + headless Chromium (Debian's, driven by Playwright).

Loads every page on an empty store, starts the demo from the New run page,
refreshes the browser while it runs, waits for it to finish, then visits every
page (every Layers tab, the Runs details) at 1440 px and at 1024 px. At each
stop it takes a screenshot (into a temporary folder, or ``$QUANTLAB_UI_SCREENSHOTS``)
and fails on a Streamlit exception box, on a table whose columns are cut off
(a data grid that scrolls sideways) and on anything reaching past the window's
right edge.

Waits are for Streamlit's own state, never fixed sleeps: the app root says
whether the script runs (``data-test-script-state``), and a page is settled when
it has stopped running, is connected and shows no loading skeleton for a while.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WIDTHS = (1440, 1024)
# Tall enough that every page fits: Streamlit scrolls inside its main block, so a
# "full page" screenshot only holds the window.
HEIGHT = 2400
DEMO_TIMEOUT_S = 300
SETTLE_TIMEOUT_S = 180  # generous: the suite runs on 2 shared cores

# What "settled" means, evaluated in the page.
SETTLED_JS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app) return false;
  const state = app.getAttribute('data-test-script-state');
  const connected = (app.getAttribute('data-test-connection-state') || '').toUpperCase() === 'CONNECTED';
  return connected && state !== 'running' && state !== 'rerunRequested' && state !== 'initial'
    && document.querySelectorAll('[data-testid="stSkeleton"]').length === 0
    && document.querySelector('[data-testid="stMain"] h1') !== null;
}"""

# Tables cut off sideways, button labels cut off, and visible elements past the window's right edge.
CLIPPED_JS = """() => {
  const problems = [];
  // Shown now: has a size and is not inside a closed expander (<details>), whose content is laid out but hidden.
  const visible = (e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0 && !e.closest('details:not([open])'); };
  const label = (e) => (e.innerText || '').trim().split('\\n').slice(0, 3).join(' | ').slice(0, 120);
  for (const grid of document.querySelectorAll('[data-testid="stDataFrame"]')) {
    if (!visible(grid)) continue;
    const scroller = grid.querySelector('.dvn-scroller') || grid;
    if (scroller.scrollWidth > scroller.clientWidth + 2)
      problems.push(`table scrolls sideways (${scroller.scrollWidth} > ${scroller.clientWidth} px): ${label(grid)}`);
  }
  for (const table of document.querySelectorAll('[data-testid="stTable"]')) {
    if (visible(table) && table.scrollWidth > table.clientWidth + 2)
      problems.push(`static table wider than its box: ${label(table)}`);
  }
  for (const button of document.querySelectorAll('[data-testid="stMain"] button')) {
    if (!visible(button)) continue;
    for (const text of button.querySelectorAll('[data-testid="stMarkdownContainer"]')) {
      if (text.scrollWidth > text.clientWidth + 1) problems.push(`button label cut off: ${label(button)}`);
    }
    const box = button.closest('[data-testid="stElementContainer"]');
    if (box && button.getBoundingClientRect().right > box.getBoundingClientRect().right + 1)
      problems.push(`button reaches past its column: ${label(button)}`);
  }
  const right = document.documentElement.clientWidth;
  for (const el of document.querySelectorAll('[data-testid="stMain"] [data-testid="stElementContainer"]')) {
    if (!visible(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.right > right + 2) problems.push(`element ends at ${Math.round(r.right)} px, window is ${right} px: ${label(el)}`);
  }
  return problems;
}"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"quantlab ui exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"quantlab ui did not come up within {timeout} s:\n{log.read_text()}")


@pytest.fixture
def server(tmp_path):
    """`quantlab ui` on a fresh store and a free loopback port."""
    port = _free_port()
    store = tmp_path / "runs.sqlite"
    log = tmp_path / "ui.log"
    script = Path(sys.executable).with_name("quantlab")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "quantlab"]
    env = dict(os.environ, QUANTLAB_DEMO_EVAL_SAMPLES="300", QUANTLAB_DEMO_CALIB_SAMPLES="128",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("QUANTLAB_STORE", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd + ["ui", "--store", str(store), "--port", str(port), "--host", "127.0.0.1"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        yield {"url": url, "store": store, "cwd": tmp_path, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


class Browser:
    def __init__(self, page, url: str, shots: Path) -> None:
        self.page, self.url, self.shots = page, url, shots
        self.width = WIDTHS[0]

    def resize(self, width: int) -> None:
        self.width = width
        self.page.set_viewport_size({"width": width, "height": HEIGHT})

    def settle(self, quiet_s: float = 1.0, timeout: float = SETTLE_TIMEOUT_S) -> None:
        """Waits until the script stopped running, the app is connected and nothing is loading, for ``quiet_s``.

        A rerun can start right after one ends (a fragment, a widget's callback):
        the state must hold for ``quiet_s`` in a row.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the page did not settle within {timeout} s ({self.page.url})")
            self.page.wait_for_function(SETTLED_JS, timeout=left * 1000, polling=100)
            calm_until = time.monotonic() + quiet_s
            while time.monotonic() < calm_until and self.page.evaluate(SETTLED_JS):
                self.page.wait_for_timeout(100)
            if time.monotonic() >= calm_until:
                return

    def check(self, name: str) -> None:
        """Screenshot, then fail on an exception box, 'Page not found' or anything cut off sideways."""
        path = self.shots / f"{name}-{self.width}.png"
        self.page.screenshot(path=str(path), full_page=True)
        boxes = self.page.locator('[data-testid="stException"]')
        assert boxes.count() == 0, f"{name} at {self.width} px: Streamlit exception: {boxes.first.inner_text()[:2000]}"
        assert self.page.get_by_text("Page not found").count() == 0, f"{name}: Streamlit says 'Page not found'"
        clipped = self.page.evaluate(CLIPPED_JS)
        assert not clipped, f"{name} at {self.width} px ({path}): " + "; ".join(clipped)

    def visit(self, path: str, name: str) -> None:
        self.page.goto(f"{self.url}/{path}")
        self.settle()
        self.check(name)

    def heading(self) -> str:
        return self.page.locator('[data-testid="stMain"] h1').first.inner_text()


@pytest.fixture
def browser(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright (dev extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium chromium-driver)")
    shots = Path(os.environ.get("QUANTLAB_UI_SCREENSHOTS") or tempfile.mkdtemp(prefix="quantlab-ui-shots-"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="quantlab-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": WIDTHS[0], "height": HEIGHT},
        )
        context.set_default_timeout(SETTLE_TIMEOUT_S * 1000)
        try:
            yield Browser(context.new_page(), server["url"], shots)
        finally:
            context.close()
            print(f"screenshots: {shots}")


EMPTY_PAGES = [("runs", "Runs"), ("compare", "Compare"), ("layers", "Layers"), ("new-run", "New run"), ("export", "Export")]


def _every_page_with_the_demo(browser: Browser) -> None:
    page = browser.page
    browser.visit("runs", "10-runs")
    assert page.get_by_text("Fashion-MNIST demo").count() > 0
    # The grid draws on a canvas under an overlay: click where the first row's checkbox is drawn.
    box = page.locator('[data-testid="stDataFrame"]').first.bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 35 + 17)
    page.get_by_text("Run folder").first.wait_for()
    browser.settle(quiet_s=0.5)
    browser.check("10b-runs-selected")
    browser.visit("compare", "11-compare")
    assert page.get_by_text("INT8 percentile").count() > 0 and page.get_by_text("Within tolerance").count() > 0
    browser.visit("layers", "12-layers-error")
    assert page.get_by_text("Lowest SQNR · ").count() > 0
    for i, tab in enumerate(["Sensitivity ranking", "Histograms", "Mixed precision"], start=13):
        page.get_by_role("tab", name=tab).click()
        browser.settle(quiet_s=0.5)
        browser.check(f"{i}-layers-{tab.split()[0].lower()}")
    browser.visit("new-run", "16-new-run")
    browser.visit("export", "17-export")
    assert page.get_by_text("model.int8.onnx").count() > 0 and page.get_by_text("calibration.cache").count() > 0


def test_every_page_and_the_demo_in_a_real_browser(server, browser):
    from quantlab.store import RunStore

    page = browser.page
    # Empty store: the Get started page is the front door; every page renders its empty state.
    # A deep link first, on a fresh server: it must get the app's navigation, not the bare page file.
    browser.visit("compare", "00-compare-deep-link")
    assert browser.heading() == "Compare"
    assert page.get_by_role("link", name="Runs").count() > 0, "a deep link was served without the app's navigation"
    for width in WIDTHS:
        browser.resize(width)
        browser.visit("", "01-get-started-empty")
        assert browser.heading() == "Welcome to quantlab"
        for i, (path, heading) in enumerate(EMPTY_PAGES, start=2):
            browser.visit(path, f"0{i}-{path}-empty")
            assert browser.heading() == heading
    browser.resize(WIDTHS[0])

    # Start the demo from the New run page.
    browser.visit("new-run", "07-new-run")
    page.get_by_role("button", name="Run the demo").click()
    page.wait_for_selector('[data-testid="stProgress"]', timeout=120_000)
    browser.check("07b-new-run-started")
    store = RunStore(server["store"])
    runs = store.list_runs("compare")
    assert len(runs) == 1 and runs[0]["name"] == "Fashion-MNIST demo"

    # A browser refresh does not stop the job: the page finds it in the store again.
    page.reload()
    page.get_by_text(runs[0]["id"]).first.wait_for(timeout=SETTLE_TIMEOUT_S * 1000)
    browser.check("08-new-run-after-refresh")

    page.get_by_text("Best INT8:").first.wait_for(timeout=DEMO_TIMEOUT_S * 1000)
    run = store.get_run(runs[0]["id"])
    assert run["status"] == "done", run["error"]
    browser.settle()
    browser.check("09-new-run-done")

    # Every page on the finished demo, at each width.
    for width in WIDTHS:
        browser.resize(width)
        _every_page_with_the_demo(browser)

    # Keep the most sensitive layer in FP16 and measure it (a real re-evaluation in the server).
    browser.resize(WIDTHS[0])
    browser.visit("layers", "18-layers")
    page.get_by_role("tab", name="Mixed precision").click()
    browser.settle(quiet_s=0.5)
    page.get_by_role("button", name="Top 1").click()
    browser.settle(quiet_s=0.5)
    page.get_by_role("button", name="Measure now").click()
    page.get_by_text("Measured on").first.wait_for(timeout=180_000)
    browser.settle(quiet_s=0.5)
    browser.check("19-layers-mixed-measured")
    browser.visit("", "20-main")
    assert browser.heading() == "Runs"  # with runs stored, the main page is Runs
