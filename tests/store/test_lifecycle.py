"""Run records: owners, computed "interrupted", prune, and finished records that are never rewritten."""
import os
import subprocess
import sys

import pytest

from quantlab.cli.main import main
from quantlab.store import ProcessOwner, RunFinishedError, RunStore
from quantlab.store.owner import host_name, process_start


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs.sqlite")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_finished_runs_are_final(store):
    run_id = store.create_run("compare", model="m")
    assert store.get_run(run_id)["owner"]["pid"] == os.getpid()
    store.add_results(run_id, [{"precision": "fp32", "calibrator": None, "metric": "top1", "value": 90.0}])
    store.set_status(run_id, "running", progress=0.5)
    store.set_status(run_id, "done")
    store.set_status(run_id, "done")  # the same status again: a no-op
    for status in ("failed", "running", "interrupted"):
        with pytest.raises(RunFinishedError, match="already done"):
            store.set_status(run_id, status, error="x")
    with pytest.raises(RunFinishedError):
        store.add_results(run_id, [{"precision": "fp32", "calibrator": None, "metric": "top1", "value": 1.0}])
    with pytest.raises(RunFinishedError):
        store.add_layer_stats(run_id, [{"calibrator": "max", "layer": "fc"}])
    store.add_artifact(run_id, "report", "/tmp/report.html")  # a later report of a finished run is allowed
    run = store.get_run(run_id)
    assert run["status"] == "done" and run["error"] is None and store.results(run_id)[0]["value"] == 90.0


def test_a_run_whose_process_died_reads_interrupted_and_prune_records_it(store, capsys):
    dead = store.create_run("export", model="m", owner=ProcessOwner(_dead_pid(), host_name(), ""))
    reused = store.create_run("export", model="m", owner=ProcessOwner(os.getpid(), host_name(), "another-boot/1"))
    alive = store.create_run("export", model="m")
    elsewhere = store.create_run("export", model="m", owner=ProcessOwner(1, "some-other-host", ""))
    assert store.get_run(dead)["status"] == "interrupted" and store.get_run(dead)["recorded_status"] == "running"
    assert "ended without recording" in store.get_run(dead)["error"]
    assert store.get_run(reused)["status"] == "interrupted"  # the pid now belongs to another process
    assert store.get_run(alive)["status"] == "running"
    assert store.get_run(elsewhere)["status"] == "running"  # another host: cannot tell, nothing guessed
    assert main(["runs", "--store", str(store.path), "--prune"]) == 0
    out = capsys.readouterr().out
    assert "2 run(s) recorded as interrupted" in out and dead in out and reused in out
    assert store.get_run(dead)["recorded_status"] == "interrupted"
    assert store.prune_dead_runs() == []


def test_claim_moves_a_running_run_to_its_worker(store):
    run_id = store.create_run("compare", model="m", owner=ProcessOwner(_dead_pid(), host_name(), ""))
    store.claim(run_id)
    assert store.get_run(run_id)["status"] == "running" and store.get_run(run_id)["owner"]["start"] == process_start(os.getpid())


def test_runs_listing_survives_a_closed_pipe(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    for _ in range(40):
        store.set_status(store.create_run("compare", model="m" * 50), "done")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = f"{sys.executable} -m quantlab runs --store {store.path} --limit 40 | head -n 2"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
