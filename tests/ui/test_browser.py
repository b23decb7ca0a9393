"""A real browser on a real server: `quantlab ui` + headless Chromium (Debian's, driven by Playwright).

Loads every page on an empty store, starts the demo from the New run page,
refreshes the browser while it runs, waits for it to finish, then visits every
page (and every Layers tab) again. Fails on any Streamlit exception box.
Screenshots go to test-artifacts/ui/.
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
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
DEMO_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
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
    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url

    def settle(self, quiet_s: float = 1.0, timeout: float = 60) -> None:
        """Waits until the app has a heading and Streamlit's 'running' indicator stayed off for ``quiet_s``."""
        self.page.wait_for_selector('[data-testid="stMain"] h1', timeout=timeout * 1000)
        deadline, quiet_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            running = self.page.locator('[data-testid="stStatusWidget"]').count() > 0
            if running:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.2)

    def check(self, name: str) -> None:
        """Screenshot, then fail on a Streamlit exception box."""
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        boxes = self.page.locator('[data-testid="stException"]')
        assert boxes.count() == 0, f"{name}: Streamlit exception: {boxes.first.inner_text()[:2000]}"
        assert self.page.get_by_text("Page not found").count() == 0, f"{name}: Streamlit says 'Page not found'"

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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="quantlab-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 1800},
        )
        try:
            yield Browser(context.new_page(), server["url"])
        finally:
            context.close()


def test_every_page_and_the_demo_in_a_real_browser(server, browser):
    from quantlab.store import RunStore

    # Empty store: the Get started page is the front door; every page renders its empty state.
    browser.visit("", "01-get-started-empty")
    assert browser.heading() == "Welcome to quantlab"
    for path, name, heading in [("runs", "02-runs-empty", "Runs"), ("compare", "03-compare-empty", "Compare"),
                                ("layers", "04-layers-empty", "Layers"), ("export", "05-export-empty", "Export")]:
        browser.visit(path, name)
        assert browser.heading() == heading

    # Start the demo from the New run page.
    browser.visit("new-run", "06-new-run")
    page = browser.page
    page.get_by_role("button", name="Run the demo").click()
    page.wait_for_selector('[data-testid="stProgress"]', timeout=60_000)
    browser.check("07-new-run-started")
    store = RunStore(server["store"])
    runs = store.list_runs("compare")
    assert len(runs) == 1 and runs[0]["name"] == "Fashion-MNIST demo"

    # A browser refresh does not stop the job: the page finds it in the store again.
    time.sleep(2)
    page.reload()
    browser.settle(quiet_s=0.3)
    page.get_by_text(runs[0]["id"]).first.wait_for(timeout=30_000)
    browser.check("08-new-run-after-refresh")

    page.get_by_text("Best INT8:").first.wait_for(timeout=DEMO_TIMEOUT_S * 1000)
    run = store.get_run(runs[0]["id"])
    assert run["status"] == "done", run["error"]
    browser.settle()
    browser.check("09-new-run-done")

    # Every page on the finished demo.
    browser.visit("runs", "10-runs")
    assert page.get_by_text("Fashion-MNIST demo").count() > 0
    browser.visit("compare", "11-compare")
    assert page.get_by_text("INT8 percentile").count() > 0 and page.get_by_text("Within tolerance").count() > 0
    browser.visit("layers", "12-layers-error")
    for i, tab in enumerate(["Sensitivity ranking", "Histograms", "Mixed precision"], start=13):
        page.get_by_role("tab", name=tab).click()
        browser.settle(quiet_s=0.5)
        browser.check(f"{i}-layers-{tab.split()[0].lower()}")
    # Keep the most sensitive layer in FP16 and measure it (a real re-evaluation in the server).
    page.get_by_role("button", name="Top 1").click()
    browser.settle(quiet_s=0.5)
    page.get_by_role("button", name="Measure now").click()
    page.get_by_text("Measured on").first.wait_for(timeout=120_000)
    browser.settle(quiet_s=0.5)
    browser.check("15b-layers-mixed-measured")
    browser.visit("export", "16-export")
    assert page.get_by_text("model.int8.onnx").count() > 0 and page.get_by_text("calibration.cache").count() > 0
    assert page.get_by_text("Every rule passed").count() > 0
    browser.visit("", "17-main")
    assert browser.heading() == "Runs"  # with runs stored, the main page is Runs
