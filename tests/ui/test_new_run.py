"""The New run page: bad input shows an error and leaves the store unchanged; good input starts a real job."""
from __future__ import annotations

from pathlib import Path

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


# -- uploads, CSV column mapping, the run folder (issue 17, item 7) -----------------------------------
MLP = b"""import torch.nn as nn


def build():
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 3))
"""


def _csv(rows: int = 48) -> bytes:
    lines = ["x1,x2,x3,target"]
    for i in range(rows):
        lines.append(f"{i / 10:.1f},{-i / 5:.1f},{(i % 7) / 3:.3f},{i % 3}")
    return ("\n".join(lines) + "\n").encode()


class _Marker:
    """Unpickling this touches a file: proof of whether a page unpickled an upload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_csv_upload_maps_columns_into_the_data_spec_and_runs(empty_store, tmp_path):
    from quantlab.data import load_data
    from quantlab.data.spec import columns_spec

    at = open_page("new_run")
    at.segmented_control(key="new-model-from").set_value("Upload a file").run()
    at.file_uploader(key="new-model-file").set_value(("mlp.py", MLP, "text/x-python")).run()
    no_exceptions(at)
    assert not at.error, _errors(at)
    at.segmented_control(key="new-source").set_value("CSV file").run()
    at.file_uploader(key="new-calib-file").set_value(("table.csv", _csv(), "text/csv")).run()
    no_exceptions(at)
    label = at.selectbox(key="new-label-col")
    assert label.options == ["x1", "x2", "x3", "target", "(no label: unlabeled data)"]  # the CSV's header
    assert label.value == "target"
    at.multiselect(key="new-input-cols-target").set_value(["x3", "x1"]).run()
    at.multiselect(key="new-calibrators").set_value(["max"])
    at.pills(key="new-precisions").set_value(["fp32", "int8"])
    at.checkbox(key="new-sensitivity").uncheck()
    at.checkbox(key="new-export").uncheck()
    at.number_input(key="new-batch").set_value(16)
    # The uploaded .py is code: nothing starts until the user says they trust it.
    _submit(at)
    assert "trust" in _errors(at)
    assert RunStore(empty_store).list_runs() == []
    at.checkbox(key="new-model-trust").check()
    _submit(at)
    assert not at.error, _errors(at)
    runs = RunStore(empty_store).list_runs()
    assert len(runs) == 1
    job = runs[0]["config"]["job"]
    inputs = empty_store.parent / "inputs"
    saved_csv = next(inputs.rglob("table.csv"))
    saved_model = next(inputs.rglob("mlp.py"))
    assert saved_csv.read_bytes() == _csv() and saved_model.read_bytes() == MLP
    assert job["model"] == f"{saved_model}:build"
    assert job["calib_data"] == job["eval_data"] == columns_spec(f"csv:{saved_csv}", ["x3", "x1"], "target")
    x, y = next(iter(load_data(job["calib_data"], batch_size=4)))
    assert x.tolist()[1] == pytest.approx([0.333, 0.1], abs=1e-6) and y.tolist() == [0, 1, 2, 0]  # x3, x1 in that order
    run_dir = str(Path(job["out_dir"]).resolve())
    assert any(run_dir in s.value for s in at.success), "the absolute run folder is not shown"
    run = wait_for_status(empty_store, runs[0]["id"], timeout=180)
    assert run["status"] == "done", run["error"]


@pytest.mark.parametrize("what", ["pickled module", "legacy pickle"])
def test_pickled_model_uploads_are_refused_without_unpickling(empty_store, tmp_path, what):
    import io
    import pickle

    import torch

    marker = tmp_path / "unpickled"
    buffer = io.BytesIO()
    if what == "pickled module":
        torch.save({"model": _Marker(str(marker))}, buffer)  # a zip archive holding a pickle
    else:
        pickle.dump(_Marker(str(marker)), buffer, protocol=2)
    at = open_page("new_run")
    at.segmented_control(key="new-model-from").set_value("Upload a file").run()
    at.file_uploader(key="new-model-file").set_value(("model.pt", buffer.getvalue(), "application/octet-stream")).run()
    no_exceptions(at)
    assert "Model file refused" in _errors(at) and "pickle" in _errors(at)
    _submit(at)
    assert "upload a model file" in _errors(at)
    assert not marker.exists(), "the upload was unpickled"
    assert RunStore(empty_store).list_runs() == []


def test_a_csv_without_a_usable_header_is_refused(empty_store):
    at = open_page("new_run")
    at.segmented_control(key="new-source").set_value("CSV file").run()
    at.file_uploader(key="new-calib-file").set_value(("bad.csv", b"x,x,y\n1,2,3\n", "text/csv")).run()
    no_exceptions(at)
    assert "repeated column" in _errors(at)
    assert all(s.key != "new-label-col" for s in at.selectbox)  # no mapping offered for a refused file


def test_the_page_shows_the_absolute_run_folder(empty_store):
    at = open_page("new_run")
    captions = "\n".join(c.value for c in at.caption)
    assert str(Path.cwd()) in captions and str((Path.cwd() / "runs").resolve()) in captions


def test_a_csv_path_gets_the_same_column_mapping(empty_store, tmp_path):
    from quantlab.data.spec import columns_spec

    path = tmp_path / "local.csv"
    path.write_bytes(_csv())
    at = open_page("new_run")
    at.segmented_control(key="new-source").set_value("CSV file").run()
    at.text_input(key="new-calib-path").input(str(path)).run()
    no_exceptions(at)
    at.selectbox(key="new-label-col").set_value("x2").run()
    assert at.multiselect(key="new-input-cols-x2").value == ["x1", "x3", "target"]  # every other column
    expected = columns_spec(f"csv:{path.resolve()}", ["x1", "x3", "target"], "x2")
    assert any(expected in c.value for c in at.caption), [c.value for c in at.caption]
    at.text_input(key="new-eval-path").input(str(tmp_path / "missing.csv")).run()
    assert "no such file" in _errors(at)
