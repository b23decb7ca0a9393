"""Run folders in the jobs layer: committed as a whole through one helper, locked before any work,
and the recorder's part (owners, adoption of running runs only)."""
import json
import os

import pytest

from quantlab.jobs.demo import run_demo
from quantlab.jobs.demo_spec import JobSpec
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.folders import JOB_FILES, commit_files, open_run_folder
from quantlab.jobs.recorder import Recorder
from quantlab.jobs.sensitivity import run_sensitivity
from quantlab.store import RunFinishedError, RunLock, RunLockedError, RunStore, read_manifest


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs.sqlite")


def test_commit_files_replaces_the_folder_and_records_after_the_commit(store, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # a previous run ...
    (out / "scales.old.json").write_text("{}")  # ... with a file the new run does not write
    (out / "job.json").write_text('{"stage": "compare"}')  # the dashboard worker's, kept
    description = RunDescription(kind=RunKind.COMPARE, model="m:build", run_dir=str(out))
    with open_run_folder(out, kind="compare", keep=JOB_FILES) as folder, Recorder(store).run(description) as run:

        def write(stage):
            assert not stage.is_relative_to(out)  # staged beside the folder, not in it
            (stage / "results.json").write_text('{"new": true}')
            return {"results": stage / "results.json"}

        final = commit_files(folder, write, run=run)
        run.artifact("results", final["results"])
    assert final == {"results": out.resolve() / "results.json"}
    assert sorted(p.name for p in out.iterdir()) == ["job.json", "quantlab-run.json", "results.json"]
    assert json.loads((out / "results.json").read_text()) == {"new": True}
    manifest = read_manifest(out)
    assert manifest["run_id"] == run.run_id and manifest["store"] == str(store.path) and manifest["files"] == ["job.json", "results.json"]
    assert [a["path"] for a in store.artifacts(run.run_id)] == [str(out.resolve() / "results.json")]


def test_the_demo_job_refuses_a_locked_folder_before_recording_or_records_the_refusal(store, tmp_path):
    out = tmp_path / "demo"
    spec = JobSpec(model="tests/qat/models.py:tiny_cnn", out_dir=str(out))
    with RunLock(out, "another demo"):
        with pytest.raises(RunLockedError, match="another demo"):
            run_demo(store, spec)
        assert store.list_runs() == []  # the CLI's demo: refused before anything is recorded
        recorder = Recorder(store)
        created = recorder.create(RunDescription(kind=RunKind.DEMO, model=spec.model, run_dir=str(out)))
        with pytest.raises(RunLockedError):
            run_demo(store, spec, run_id=created)  # the dashboard's worker adopted its run first
    run = store.get_run(created)
    assert run["status"] == "failed" and "another demo" in run["error"]  # not left running


def test_sensitivity_holds_the_run_folder_lock_before_any_work(store, tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir, "quantlab compare"):
        with pytest.raises(RunLockedError, match="quantlab compare"):
            run_sensitivity({"run_dir": str(run_dir), "model": "missing.py:build"}, store)
    assert store.list_runs() == []


def test_the_recorder_adopts_running_runs_only_and_takes_them_over(store):
    recorder = Recorder(store)
    created = recorder.create(RunDescription(kind=RunKind.DEMO, model="m:build"))
    with recorder.run(RunDescription(kind=RunKind.DEMO, model="m:build"), run_id=created):
        assert store.get_run(created)["owner"]["pid"] == os.getpid()  # claimed by the adopting process
    assert store.get_run(created)["status"] == "done"
    with pytest.raises(RunFinishedError, match="already done"):
        with recorder.run(RunDescription(kind=RunKind.DEMO, model="m:build"), run_id=created):
            pass
    assert store.get_run(created)["status"] == "done"  # a finished record is never taken over
    assert recorder.prune() == [] and Recorder(None).prune() == []
