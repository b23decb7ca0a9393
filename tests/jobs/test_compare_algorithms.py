"""Compare with PTQ algorithms: one INT8 row per prefix of the pipeline and calibrator, its files, and
autoprecision starting from the best of them (the demo CNN, the test-only algorithms, a few batches)."""
import json

import pytest

from quantlab.data import load_data
from quantlab.evaluation.evaluate import evaluate
from quantlab.jobs.autoprecision import run_autoprecision
from quantlab.jobs.compare import run_compare
from quantlab.jobs.runs import choose_variant, load_run_info, quantized_copy, rebuild
from quantlab.models import pretrained_fmnist_cnn
from quantlab.store import RunStore
import quantlab as ql
from tests import ptq_algorithms

MODEL = "quantlab.models.fmnist:pretrained_fmnist_cnn"
SOURCES = ["ptq", "ptq+test-rescale", "ptq+test-rescale+test-clamp", "ptq+test-rescale+test-clamp+test-nudge"]


@pytest.fixture(scope="module")
def registered():
    with pytest.MonkeyPatch.context() as monkeypatch:  # one compare run for the module: registered as long
        ptq_algorithms.register(monkeypatch)
        yield


@pytest.fixture(scope="module")
def compared(registered, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare-algorithms")
    describe = {"model": MODEL, "data": "fmnist:calib[:256]", "eval_data": "fmnist:test[:256]", "batch_size": 128}
    calib = load_data(describe["data"], batch_size=128)
    eval_data = load_data(describe["eval_data"], batch_size=128)
    store = RunStore(tmp_path / "runs.sqlite")
    config = ql.int8_config().replace(algorithms=("test-nudge", "test-clamp", "test-rescale"),
                                      algorithm_params={"test-rescale": {"factor": 3.0}})
    result = run_compare(pretrained_fmnist_cnn(), calib, eval_data, calibrators="max,percentile", precisions="fp32,int8",
                         config=config, layer_batches=1, store=store, run_dir=tmp_path / "run", describe=describe)
    return result, store, tmp_path / "run"


def test_each_prefix_of_the_pipeline_is_its_own_row_per_calibrator(compared):
    result, store, run_dir = compared
    int8 = [(r.source, r.calibrator) for r in result.primary_rows() if r.precision == "int8"]
    assert int8 == [(s, c) for s in SOURCES for c in ("max", "percentile")]
    assert list(result.variants) == SOURCES
    assert result.variants["ptq"].model is None  # nothing changed the weights: no checkpoint, no copy kept
    recorded = {(r["source"], r["calibrator"]) for r in store.results(result.run_id) if r["precision"] == "int8"}
    assert recorded == set(int8)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["algorithms"] == ["test-rescale", "test-clamp", "test-nudge"]  # pipeline order, whatever order given
    assert info["quant_config"]["algorithm_params"] == {"test-rescale": {"factor": 3.0}}


def test_files_per_row_and_the_best_row(compared):
    result, _, run_dir = compared
    names = {p.name for p in run_dir.iterdir()}
    for calibrator in ("max", "percentile"):
        assert f"scales.{calibrator}.json" in names and f"model.{calibrator}.safetensors" in names  # the full pipeline
        assert f"scales.{calibrator}.ptq.json" in names and f"model.{calibrator}.ptq.safetensors" not in names
        assert f"model.{calibrator}.ptq+test-rescale.safetensors" in names
    results = json.loads((run_dir / "results.json").read_text())
    best = result.best_row
    assert (results["best_calibrator"], results["best_source"]) == (best.calibrator, best.source)
    assert set(results["checkpoints"]) == {f"{c}{s}" for c in ("max", "percentile")
                                           for s in ("", ".ptq+test-rescale", ".ptq+test-rescale+test-clamp")}


@pytest.mark.parametrize("source", SOURCES)
def test_the_files_rebuild_each_rows_model(compared, source):
    result, store, run_dir = compared
    info = load_run_info(run_dir)
    model, batches, task, metric, _ = rebuild(info)
    quant = quantized_copy(model, info, "percentile", source)
    row = next(r for r in result.primary_rows() if r.precision == "int8" and r.source == source and r.calibrator == "percentile")
    assert evaluate(quant, task, batches).metrics[metric] == row.value


def test_autoprecision_starts_from_the_best_row(compared):
    result, store, run_dir = compared
    info = load_run_info(run_dir)
    best = result.best_row
    assert choose_variant(info) == (best.calibrator, best.source)
    assert choose_variant(info, "max", "ptq+test-rescale") == ("max", "ptq+test-rescale")
    with pytest.raises(Exception, match="--from 'ptq\\+nope'"):
        choose_variant(info, None, "ptq+nope")
    outcome = run_autoprecision(info, store, max_drop=100.0, order="proxy", export_onnx=False)
    assert (outcome["calibrator"], outcome["source"]) == (best.calibrator, best.source)
    assert outcome["result"].int8 == best.value  # the row it started from
    assert outcome["artifacts"]["scales"].endswith("scales.mixed.json")


def test_export_now_of_a_run_with_algorithms_uses_its_checkpoint(compared):
    # What the dashboard's "Export now" runs for a stored compare run.
    from quantlab.jobs.export import export_recorded_run
    from quantlab.export.check import check_model
    import onnx

    result, store, run_dir = compared
    outcome = export_recorded_run(store, store.get_run(result.run_id), "percentile")
    onnx_path = outcome["outputs"]["onnx"]
    assert check_model(onnx_path).errors == []
    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert "test-nudge" in meta["quantlab.algorithms"]
    assert any("calibration cache: not written" in s for s in outcome["skipped"])
