"""Helpers of the dashboard tests (AppTest on the real app file, waiting for a job)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

from quantlab.store import RunStore

APP = Path(__file__).resolve().parents[2] / "ui" / "app.py"
PAGES = ("welcome", "runs", "compare", "layers", "new_run", "export")


def app_test(timeout: float = 60):
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(APP), default_timeout=timeout)


def open_page(name: str, timeout: float = 60):
    """An AppTest showing page ``name`` (after the main script ran once)."""
    at = app_test(timeout)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page(f"views/{name}.py").run()
    return at


def wait_for_status(store_path: Path, run_id: str, timeout: float = 120) -> Dict[str, Any]:
    store = RunStore(store_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run["status"] != "running":
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} still running after {timeout} s")


def no_exceptions(at) -> None:
    assert not at.exception, "\n".join(str(e.value) for e in at.exception)
