"""`quantlab qat --sparsity 2:4` and `quantlab compare --sparsity 2:4` end to end (in-process, small data)."""
import json

import torch

from quantlab import sparsity
from quantlab.cli.main import main
from quantlab.store import RunStore

FACTORY = "tests/qat/models.py:tiny_cnn"


def test_sparse_qat_records_dense_fp32_and_2to4_rows_and_saves_sparse_weights(tmp_path, monkeypatch, capsys):
    store_path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QUANTLAB_STORE", str(store_path))
    out = tmp_path / "qat"
    code = main(["qat", "--model", FACTORY, "--data", "fmnist:train[:256]", "--eval", "fmnist:test[:128]", "--calibrator", "max",
                 "--calib-batches", "2", "--max-steps", "3", "--batch-size", "64", "--lr", "1e-3", "--out", str(out),
                 "--sparsity", "2:4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2:4 (magnitude): pruned 2 layer(s)" in printed and "2:4 + int8" in printed
    state = torch.load(out / "model.pt", weights_only=True)
    assert sparsity.is_2to4(state["pw.weight"], 1) and sparsity.is_2to4(state["fc.weight"], 1)
    assert not sparsity.is_2to4(state["dw.weight"], 1)  # depthwise: left dense
    (run,) = RunStore(store_path).list_runs("qat")
    assert run["config"]["sparsity"] == "2:4"
    rows = {(r["precision"], r["source"]): r for r in RunStore(store_path).results(run["id"])}
    assert set(rows) == {("fp32", "qat"), ("int8", "sparse"), ("int8", "sparse-qat")}
    # The FP32 reference is the dense model's (measured before pruning).
    from quantlab.evaluation.evaluate import evaluate_reference
    from quantlab.evaluation.tasks import task_for_metric
    from quantlab.data import load_data
    from tests.qat.models import tiny_cnn

    task, _ = task_for_metric("top1")
    dense = evaluate_reference(tiny_cnn(), task, list(load_data("fmnist:test[:128]", batch_size=64)))
    assert rows[("fp32", "qat")]["value"] == dense.metrics["top1"]
    assert json.loads((out / "run.json").read_text())["fp32"] == dense.metrics["top1"]


def test_compare_adds_2to4_rows_and_says_when_speed_is_not_measured(tmp_path, capsys):
    store_path = tmp_path / "runs.sqlite"
    code = main(["compare", "--model", FACTORY, "--data", "fmnist:calib[:128]", "--eval", "fmnist:test[:128]",
                 "--calibrators", "max", "--precisions", "fp32,int8", "--layer-batches", "0", "--out", str(tmp_path / "cmp"),
                 "--store", str(store_path), "--sparsity", "2:4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2:4 + INT8 max" in printed and "2:4 + INT8 rows: 2 layer(s) pruned (magnitude); left dense: stem.0, dw" in printed
    assert "2:4 speed: not measured" in printed
    (run,) = RunStore(store_path).list_runs("compare")
    sources = {(r["precision"], r["calibrator"], r["source"]) for r in RunStore(store_path).results(run["id"])}
    assert ("int8", "max", "sparse") in sources and ("int8", "max", "ptq") in sources
    assert not any(r["metric"] == "latency_ms" for r in RunStore(store_path).results(run["id"]))


def test_a_bad_pattern_fails_before_any_work(tmp_path, capsys):
    store_path = tmp_path / "runs.sqlite"
    code = main(["compare", "--model", FACTORY, "--data", "fmnist:calib[:64]", "--eval", "fmnist:test[:64]",
                 "--calibrators", "max", "--out", str(tmp_path / "cmp"), "--store", str(store_path),
                 "--sparsity", "2:4", "--sparsity-include", "encoder.*"])
    assert code == 1
    assert "pattern 'encoder.*' matches no prunable layer of TinyCNN" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    assert not store_path.exists() or not RunStore(store_path).list_runs("compare")
