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


def test_sparse_rows_and_the_measured_speed_are_recorded_in_the_run(planted, tmp_path, monkeypatch):
    """2:4 + INT8 rows through the job's recorder; the speed rows where a GPU measured them (the
    measurement itself needs cuSPARSELt on a GPU: stubbed here, the glue around it is real)."""
    from quantlab.runtimes.cusparselt import library, speed
    from quantlab.sparsity.compare import SparseCompare
    from quantlab.sparsity.mask import masked_layers

    timed = []
    monkeypatch.setattr("quantlab.sparsity.compare.model_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(library, "load_library", lambda: object())
    monkeypatch.setattr(speed, "measure_speedup", lambda model, inputs: timed.append(model) or
                        {"fp16_ms": 3.0, "int8_ms": 1.5, "speedup": 2.0, "timing": "graph/graph"})
    model, calib, evaluation = planted
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_compare(model, calib, evaluation, calibrators="max,percentile", precisions="fp32,int8", layer_batches=0,
                         store=store, run_dir=tmp_path / "run", sparsity=SparseCompare(exclude=("head",)))
    assert not masked_layers(model)  # pruned a copy
    (pruned,) = timed
    assert masked_layers(pruned) == ["fc1", "bad", "fc3"]
    (report,) = result.sparsity.reports
    assert report.layers and result.sparsity.speed["speedup"] == 2.0 and result.sparsity.speed_note is None
    rows = {(r["precision"], r["calibrator"], r["source"], r["metric"]): r["value"] for r in store.results(result.run_id)}
    assert {k[:3] for k in rows if k[3] == "top1"} == {("fp32", None, "ptq"), ("int8", "max", "ptq"), ("int8", "percentile", "ptq"),
                                                       ("int8", "max", "sparse"), ("int8", "percentile", "sparse")}
    # The timed copy holds the last calibrator's ranges: its latency row says so.
    assert {k: v for k, v in rows.items() if k[3] == "latency_ms"} == {
        ("fp16", None, "ptq", "latency_ms"): 3.0, ("int8", "percentile", "sparse", "latency_ms"): 1.5}
    run = store.get_run(result.run_id)
    assert run["status"] == "done" and run["config"]["sparsity"] == "2:4" and run["config"]["sparsity_method"] == "magnitude"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(saved["rows"]) == len(store.results(result.run_id))


def test_sparse_rows_need_int8_and_a_prunable_selection_before_anything_is_recorded(planted, tmp_path):
    from quantlab.errors import ConfigError
    from quantlab.sparsity.compare import SparseCompare
    from quantlab.sparsity.errors import SparsityError

    model, calib, evaluation = planted
    store = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(ConfigError, match="keep int8"):
        run_compare(model, calib, evaluation, precisions="fp32,fp16", store=store, sparsity=SparseCompare())
    with pytest.raises(SparsityError, match="'encoder.*' matches no prunable layer"):
        run_compare(model, calib, evaluation, store=store, sparsity=SparseCompare(include=("encoder.*",)))
    assert store.list_runs() == []
