"""Bad input to compare: clear errors, and the run store and run folder are left untouched."""
import hashlib

import pytest
import torch

from quantlab.cli.main import main
from quantlab.jobs.compare import run_compare as compare
from quantlab.evaluation.errors import EvaluationError, MetricError, UnknownMetricError
from quantlab.store import RunStore, StoreFormatError


def _snapshot(store):
    return [(r["id"], r["status"]) for r in store.list_runs()]


def test_metric_function_that_raises(planted, tmp_path):
    model, calib, evaluation = planted
    (tmp_path / "bad_metric.py").write_text("def explode(outputs, targets):\n    raise RuntimeError('metric exploded')\n")
    store = RunStore(tmp_path / "runs.sqlite")
    with pytest.raises(MetricError, match=r"bad_metric.py:explode raised RuntimeError: metric exploded"):
        compare(model, calib, evaluation, metric=f"{tmp_path / 'bad_metric.py'}:explode", store=store, run_dir=tmp_path / "run")
    assert _snapshot(store) == [] and not (tmp_path / "run").exists()


def test_eval_data_of_the_wrong_shape(planted, tmp_path):
    model, calib, _ = planted
    store = RunStore(tmp_path / "runs.sqlite")
    wrong = [(torch.randn(8, 17), torch.zeros(8, dtype=torch.long))]  # the model takes 16 features
    with pytest.raises(EvaluationError, match=r"eval batch 0 \(inputs tensor\[8, 17\] float32\).*RuntimeError"):
        compare(model, calib, wrong, store=store, run_dir=tmp_path / "run")
    float_labels = [(torch.randn(8, 16), torch.zeros(8))]
    with pytest.raises(EvaluationError, match="expected one integer label per row"):
        compare(model, calib, float_labels, store=store, run_dir=tmp_path / "run")
    with pytest.raises(UnknownMetricError):
        compare(model, calib, float_labels, metric="bleu", store=store)
    assert _snapshot(store) == [] and not (tmp_path / "run").exists()


def test_store_file_that_is_not_sqlite_via_cli(tmp_path, capsys):
    bogus = tmp_path / "runs.sqlite"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file, not SQLite" * 10)
    digest = hashlib.sha256(bogus.read_bytes()).hexdigest()
    code = main(["runs", "--store", str(bogus)])
    err = capsys.readouterr().err
    assert code == 1 and "quantlab runs: error:" in err and str(bogus) in err and "not an SQLite database" in err
    assert hashlib.sha256(bogus.read_bytes()).hexdigest() == digest
    with pytest.raises(StoreFormatError):
        RunStore(bogus)


def test_missing_run_id_via_cli(tmp_path, capsys):
    store = RunStore(tmp_path / "runs.sqlite")
    keep = store.create_run("compare", model="m")
    for argv in (["runs", "--show", "compare-00000000-000000-000000"],
                 ["sensitivity", "--run", "compare-00000000-000000-000000"],
                 ["autoprecision", "--run", "compare-00000000-000000-000000", "--max-drop", "1"],
                 ["report", "--run", "compare-00000000-000000-000000"]):
        code = main(argv + ["--store", str(store.path)])
        err = capsys.readouterr().err
        assert code == 1, argv
        assert "compare-00000000-000000-000000" in err and "error:" in err, err
    assert _snapshot(store) == [(keep, "running")]
