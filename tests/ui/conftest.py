"""Fixtures of the dashboard tests: an empty run store, and one with a REAL demo run.

The demo run is made once per session by ``quantlab demo --no-ui`` (the real
pipeline: compare with every calibrator, sensitivity, Q/DQ export, check,
calibration cache, report) on a small Fashion-MNIST subset.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from quantlab.store import STORE_ENV, RunStore

# Small enough to keep the whole demo pipeline to seconds, large enough for every stage to mean something.
DEMO_EVAL_SAMPLES = 300
DEMO_CALIB_SAMPLES = 128


@pytest.fixture
def empty_store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "store" / "runs.sqlite"
    RunStore(path)
    monkeypatch.setenv(STORE_ENV, str(path))
    monkeypatch.chdir(tmp_path)  # run folders of jobs started by a test land here
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Dict[str, Any]:
    """A store holding one real demo run (plus its sensitivity and export child runs)."""
    from quantlab.cli.main import main

    root = tmp_path_factory.mktemp("ui-demo")
    store_path = root / "runs.sqlite"
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--no-ui", "--store", str(store_path), "--out", str(root / "demo"),
                     "--eval-samples", str(DEMO_EVAL_SAMPLES), "--calib-samples", str(DEMO_CALIB_SAMPLES)])
    assert code == 0, out.getvalue()
    store = RunStore(store_path)
    compare = [r for r in store.list_runs("compare")]
    assert len(compare) == 1
    return {"store": store_path, "run": compare[0], "out": root / "demo", "stdout": out.getvalue(),
            "seconds": time.perf_counter() - start}


@pytest.fixture
def demo_store(demo_run, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(STORE_ENV, str(demo_run["store"]))
    monkeypatch.chdir(tmp_path)
    return demo_run["store"]
