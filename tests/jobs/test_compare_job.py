"""The compare job from Python on the planted MLP: rows in the store as they come, run folder, failures recorded."""
import copy
import json

import pytest
import torch

from quantlab.evaluation.compare import Candidate
from quantlab.evaluation.errors import EvaluationError
from quantlab.jobs.compare import run_compare
from quantlab.store import RunStore


def test_rows_store_and_run_folder(planted, tmp_path):
    model, calib, evaluation = planted
    before = copy.deepcopy(model.state_dict())
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_compare(model, calib, evaluation, metric="top1", calibrators="max,percentile", store=store,
                         run_dir=tmp_path / "run", describe={"model": "planted", "data": "synthetic", "eval_data": "synthetic"})
    assert result.value("fp32") == 100.0 and result.value("fp16") == pytest.approx(100.0, abs=1.0)
    assert result.value("int8", "max") < 90.0  # the planted outlier
    assert {(r.precision, r.calibrator) for r in result.primary_rows()} == {("fp32", None), ("fp16", None), ("int8", "max"), ("int8", "percentile")}
    assert result.best_calibrator in ("max", "percentile")
    # The caller's model is untouched: FP16 and INT8 ran on copies.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "input_quantizer") for m in model.modules())
    run = store.get_run(result.run_id)
    assert run["status"] == "done" and run["config"]["calibrators"] == ["max", "percentile"] and run["model"] == "planted"
    stored = {(r["precision"], r["calibrator"], r["metric"]): r["value"] for r in store.results(result.run_id)}
    assert stored[("int8", "max", "top1")] == result.value("int8", "max")
    assert {r["layer"] for r in store.layer_stats(result.run_id)} == {"fc1", "bad", "fc3", "head"}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["best_calibrator"] == result.best_calibrator and len(saved["rows"]) == len(result.rows)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == result.run_id


def test_a_failure_after_the_run_started_marks_it_failed(planted, tmp_path):
    model, calib, evaluation = planted
    store = RunStore(tmp_path / "runs.sqlite")

    def broken(ptq):
        return [Candidate(precision="int8", calibrator="max", source="ptq", model=lambda x: torch.zeros(3, 3, 3))]

    with pytest.raises(EvaluationError, match="eval batch 0"):
        run_compare(model, calib, evaluation, calibrators="max", store=store, extra_candidates=broken)
    (run,) = store.list_runs()
    assert run["status"] == "failed" and "eval batch 0" in run["error"]
