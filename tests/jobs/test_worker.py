"""Demo jobs in a background worker (the dashboard's): validation before anything is recorded, failures
recorded by the worker, lost workers."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from quantlab.jobs import worker as jobs
from quantlab.jobs.demo import job_file
from quantlab.jobs.demo_spec import JobInputError, JobSpec, demo_spec, validate
from quantlab.store import RunStore
from tests.ui.helpers import wait_for_status


def _spec(tmp_path, **changes) -> JobSpec:
    base = dataclasses.replace(demo_spec(str(tmp_path / "run"), eval_samples=64, calib_samples=64),
                               calibrators=["max"], sensitivity=False, export=False)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    "changes, field, fragment",
    [
        ({"model": "no_such_pkg:build"}, "model", "no_such_pkg"),
        ({"model": ""}, "model", "give a model"),
        ({"model": "nothing_here.pt2"}, "model", "nothing_here.pt2"),
        ({"weights": "missing_weights.pt"}, "weights", "missing_weights.pt"),
        ({"calib_data": "csv:/no/such/file.csv"}, "calibration data", "/no/such/file.csv"),
        ({"eval_data": "fmnist:nosplit"}, "eval data", "nosplit"),
        ({"eval_data": ""}, "eval data", "give a data spec"),
        ({"calibrators": ["nope"]}, "calibrators", "nope"),
        ({"metric": "not_a_metric"}, "metric", "not_a_metric"),
        ({"precisions": ["int4"]}, "precisions", "int4"),
        ({"batch_size": 0}, "batch size", ">= 1"),
    ],
)
def test_bad_input_is_rejected_before_the_run_exists(tmp_path, changes, field, fragment):
    store = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(JobInputError) as info:
        jobs.start_job(_spec(tmp_path, **changes), store.path)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert store.list_runs() == []
    assert not (tmp_path / "run").exists()


def test_validate_normalizes_the_spec(tmp_path):
    spec = validate(_spec(tmp_path, precisions=["int8", "FP16"], calibrators=[], out_dir=""))
    assert spec.precisions == ["fp32", "fp16", "int8"]  # FP32 always: it is the reference
    assert set(spec.calibrators) >= {"max", "entropy", "mse", "percentile"}
    assert spec.out_dir.startswith("runs/ui-")
    no_int8 = validate(_spec(tmp_path, precisions=["fp32"], export=True, sensitivity=True))
    assert not no_int8.export and not no_int8.sensitivity and no_int8.calibrators == []


def test_a_job_that_fails_in_the_worker_is_recorded_as_failed(tmp_path, monkeypatch):
    # Imports fine (validation passes) but the factory raises when the worker builds the model.
    (tmp_path / "broken_model.py").write_text("def build():\n    raise RuntimeError('weights are corrupt on purpose')\n")
    monkeypatch.chdir(tmp_path)
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = jobs.start_job(_spec(tmp_path, model="broken_model.py:build"), store.path)
    run = wait_for_status(store.path, run_id, timeout=120)
    assert run["status"] == "failed"
    assert "weights are corrupt on purpose" in run["error"]
    state = jobs.job_state(run)
    assert state["status"] == "failed" and not state["lost"]
    info = json.loads(job_file(tmp_path / "run").read_text())
    assert info["stage"] == "failed" and "RuntimeError" in info["traceback"]


def test_a_worker_that_died_without_a_word_is_reported_lost(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    spec = validate(_spec(tmp_path))
    run_id = jobs.create_job_run(store, spec)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    job_file(tmp_path / "run").write_text(json.dumps({"pid": dead.pid, "stage": "compare"}))
    state = jobs.job_state(store.get_run(run_id))
    assert state["status"] == "running" and state["lost"] and state["stage"] == "compare"


def test_the_worker_rejects_a_run_without_a_job_spec(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run("compare", model="m:f", config={"metric": "top1"})
    assert jobs.main(["--store", str(store.path), run_id]) == 1
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "no dashboard job spec" in run["error"]
