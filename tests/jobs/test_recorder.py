"""The recorder (the run store's one writer): done, failed, interrupted, no store, adoption, children, reports."""
import pytest

from quantlab.errors import QuantlabError
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.errors import RecorderError
from quantlab.jobs.recorder import Recorder, outcome
from quantlab.store import STATUSES, RunStore

ROW = {"precision": "fp32", "calibrator": None, "source": "ptq", "metric": "top1", "value": 91.5, "delta": 0.0, "seconds": 1.0}


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs.sqlite")


def _compare(**changes):
    return RunDescription(**{"kind": RunKind.COMPARE, "model": "m:build", "eval_data": "fmnist:test", "config": {"metric": "top1"},
                             **changes})


def test_normal_exit_records_done_with_everything(store, tmp_path):
    recorder = Recorder(store)
    artifact = tmp_path / "results.json"
    artifact.write_text("{}")
    with recorder.run(_compare(name="first", run_dir=str(tmp_path))) as run:
        assert store.get_run(run.run_id)["status"] == "running"
        run.results([ROW])
        run.layer_stats([{"calibrator": "max", "layer": "fc1", "sqnr_db": 30.0}])
        run.progress(0.5, "int8 max")
        assert store.get_run(run.run_id)["progress"] == 0.5 and run.stage == "int8 max"
        run.artifact("results", artifact)
    record = store.get_run(run.run_id)
    assert record["status"] == "done" and record["progress"] == 1.0 and record["error"] is None
    assert record["kind"] == "compare" and record["name"] == "first" and record["config"] == {"metric": "top1"}
    assert record["run_dir"] == str(tmp_path.resolve())
    assert store.results(run.run_id)[0]["value"] == 91.5
    assert [r["layer"] for r in store.layer_stats(run.run_id)] == ["fc1"]
    assert [a["kind"] for a in store.artifacts(run.run_id)] == ["results"]


def test_an_exception_records_failed_with_one_line_and_propagates(store):
    recorder = Recorder(store)
    with pytest.raises(RuntimeError, match="boom"):
        with recorder.run(_compare()) as run:
            run.results([ROW])
            raise RuntimeError("boom\n  on the second line")
    (record,) = store.list_runs()
    assert record["status"] == "failed" and record["error"] == "RuntimeError: boom on the second line"
    assert store.results(run.run_id)[0]["metric"] == "top1"  # what was recorded before the failure stays

    class Bad(QuantlabError):
        pass

    with pytest.raises(Bad):
        with recorder.run(_compare()):
            raise Bad("layer fc1 has no range")
    assert store.list_runs()[0]["error"] == "layer fc1 has no range"  # a quantlab error is its message


def test_an_interrupt_is_recorded_as_interrupted_where_the_store_knows_it(store):
    with pytest.raises(KeyboardInterrupt):
        with Recorder(store).run(_compare(), interrupted_hint="resume with --resume"):
            raise KeyboardInterrupt
    (record,) = store.list_runs()
    expected = "interrupted" if "interrupted" in STATUSES else "failed"
    assert record["status"] == expected and record["error"] == "interrupted (resume with --resume)"
    assert outcome(KeyboardInterrupt())[0] == expected


def test_a_failed_result_without_an_exception(store):
    with Recorder(store).run(_compare()) as run:
        run.fail("check found 2 errors")
    record = store.get_run(run.run_id)
    assert record["status"] == "failed" and record["error"] == "check found 2 errors"


def test_no_store_records_nothing_and_runs_the_block(tmp_path):
    for nothing in (None, False):
        recorder = Recorder(nothing)
        with recorder.run(_compare()) as run:
            run.results([ROW])
            run.progress(0.3)
            run.artifact("results", tmp_path / "x")
        assert run.run_id is None and not run.recording and run.store_path is None and run.fraction == 0.3
        assert recorder.create(_compare()) is None and not recorder.knows("compare-x")
    with pytest.raises(ValueError):
        with Recorder(None).run(_compare()):
            raise ValueError("still raised")
    assert not (tmp_path / "runs.sqlite").exists()


def test_children_and_adoption_go_through_the_same_recorder(store):
    recorder = Recorder(store)
    created = recorder.create(_compare())  # e.g. the dashboard, before its worker starts
    assert store.get_run(created)["status"] == "running"
    with recorder.run(_compare(), run_id=created) as parent:
        assert parent.run_id == created
        child_description = RunDescription(kind=RunKind.SENSITIVITY, model="m:build", parent_id=parent.run_id)
        with pytest.raises(ZeroDivisionError):
            with recorder.run(child_description):
                1 / 0
        with recorder.run(child_description) as child:
            child.layer_stats([{"calibrator": "max", "layer": "fc1", "rank": 1}])
    runs = {r["id"]: r for r in store.list_runs()}
    assert len(runs) == 3 and runs[created]["status"] == "done"
    children = [r for r in runs.values() if r["parent_id"] == created]
    assert sorted(r["status"] for r in children) == ["done", "failed"] and all(r["kind"] == "sensitivity" for r in children)
    assert recorder.knows(created) and not recorder.knows("compare-20260101-000000-000000")


def test_a_report_is_recorded_on_its_run_and_leaves_its_status(store, tmp_path):
    recorder = Recorder(store)
    with recorder.run(_compare()) as compare:
        pass
    report = RunDescription(kind=RunKind.REPORT, model="m:build", parent_id=compare.run_id, config={"format": "html"})
    with recorder.run(report) as run:
        assert run.run_id == compare.run_id
        run.artifact("report", tmp_path / "report.html")
        with pytest.raises(RecorderError):
            run.results([ROW])
    with pytest.raises(OSError):
        with recorder.run(report):
            raise OSError("disk full")
    assert [r["status"] for r in store.list_runs()] == ["done"]  # one run, still done
    assert [a["kind"] for a in store.artifacts(compare.run_id)] == ["report"]
    with pytest.raises(RecorderError):
        recorder.create(report)


def test_fail_and_attach_on_recorded_runs(store, tmp_path):
    recorder = Recorder(store)
    run_id = recorder.create(_compare())
    recorder.fail(run_id, OSError("could not start the worker"))
    assert store.get_run(run_id)["error"] == "OSError: could not start the worker"
    recorder.attach(run_id, "engine", tmp_path / "model.plan")
    assert store.artifacts(run_id)[0]["kind"] == "engine" and store.get_run(run_id)["status"] == "failed"
    with pytest.raises(RecorderError):
        with recorder.run({"kind": "compare", "model": "m"}):
            pass


def test_sigterm_during_a_run_is_recorded_as_an_interruption(tmp_path):
    import json
    import subprocess
    import sys

    store_path = tmp_path / "runs.sqlite"
    script = (
        "import sys, time\n"
        "from quantlab.jobs.description import RunDescription\n"
        "from quantlab.jobs.recorder import Recorder\n"
        "from quantlab.store import RunStore\n"
        f"with Recorder(RunStore({str(store_path)!r})).run(RunDescription(kind='compare', model='m:build')):\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    (record,) = RunStore(store_path).list_runs()
    assert record["status"] == ("interrupted" if "interrupted" in STATUSES else "failed")
    assert record["error"] == "interrupted (stopped by SIGTERM)", json.dumps(record)  # unwound well before its 60 s sleep
