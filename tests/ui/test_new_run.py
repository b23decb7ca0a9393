"""The New run page: bad input shows an error and leaves the store unchanged; good input starts a real job."""
from __future__ import annotations

import pytest

from quantlab.store import RunStore
from tests.ui.helpers import no_exceptions, open_page, wait_for_status


def _submit(at):
    at.button(key="FormSubmitter:new-run-form-Start run").click().run()
    no_exceptions(at)
    return at


def _errors(at) -> str:
    return "\n".join(e.value for e in at.error)


@pytest.mark.parametrize(
    "model, expected",
    [
        ("no_such_package.models:build", "no_such_package"),
        ("missing_model.py:build", "model file not found"),
        ("quantlab.models.fmnist:no_such_factory", "no_such_factory"),
        ("weights.pt", "model file not found"),
    ],
)
def test_bad_model_shows_an_error_and_leaves_the_store_unchanged(empty_store, model, expected):
    at = open_page("new_run")
    at.text_input(key="new-model").input(model)
    _submit(at)
    assert "model" in _errors(at) and expected in _errors(at), _errors(at)
    assert RunStore(empty_store).list_runs() == []
    assert not (empty_store.parent.parent / "runs").exists()


def test_missing_data_shows_an_error_and_leaves_the_store_unchanged(empty_store, tmp_path):
    at = open_page("new_run")
    at.segmented_control(key="new-source").set_value("Dataset spec").run()
    no_exceptions(at)
    missing = tmp_path / "nowhere" / "calib.csv"
    at.text_input(key="new-calib").input(f"csv:{missing}")
    at.text_input(key="new-eval").input("fmnist:test[:100]")
    _submit(at)
    assert "calibration data" in _errors(at) and str(missing) in _errors(at), _errors(at)
    assert RunStore(empty_store).list_runs() == []


def test_unknown_data_prefix_is_reported(empty_store):
    at = open_page("new_run")
    at.segmented_control(key="new-source").set_value("Dataset spec").run()
    at.text_input(key="new-calib").input("fmnist:calib[:64]")
    at.text_input(key="new-eval").input("nosuchformat:data")
    _submit(at)
    assert "eval data" in _errors(at) and "nosuchformat" in _errors(at)
    assert RunStore(empty_store).list_runs() == []


def test_the_form_starts_a_real_background_job_and_follows_it(empty_store):
    at = open_page("new_run")
    at.multiselect(key="new-calibrators").set_value(["max"])
    at.pills(key="new-precisions").set_value(["fp32", "int8"])
    at.checkbox(key="new-sensitivity").uncheck()
    at.checkbox(key="new-export").uncheck()
    at.select_slider(key="new-calib-n").set_value(128)
    at.select_slider(key="new-eval-n").set_value(500)
    at.text_input(key="new-name").input("form job")
    _submit(at)
    assert not at.error, _errors(at)
    runs = RunStore(empty_store).list_runs()
    assert len(runs) == 1 and runs[0]["name"] == "form job"
    job = runs[0]["config"]["job"]
    # What the widgets said is what the job runs.
    assert job["calibrators"] == ["max"] and job["precisions"] == ["fp32", "int8"]
    assert job["calib_data"] == "fmnist:calib[:128]" and job["eval_data"] == "fmnist:test[:500]"
    assert job["sensitivity"] is False and job["export"] is False
    assert at.session_state["active_jobs"] == [runs[0]["id"]]

    run = wait_for_status(empty_store, runs[0]["id"], timeout=180)
    assert run["status"] == "done", run["error"]
    rows = RunStore(empty_store).results(run["id"])
    assert {(r["precision"], r["calibrator"]) for r in rows} == {("fp32", None), ("int8", "max")}
    at.run()  # the page (as after a browser refresh) shows the finished job
    no_exceptions(at)
    assert any(p.value == 100 and p.text == "done" for p in at.progress)
    assert any("Best INT8" in m.value for m in at.markdown)
