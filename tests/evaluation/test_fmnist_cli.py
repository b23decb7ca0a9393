"""The whole workflow on the real Fashion-MNIST CNN through the CLI: compare -> sensitivity ->
autoprecision -> runs -> report, every command recorded in one run store."""
import json

import pytest

from quantlab.calibrators import list_calibrators
from quantlab.cli.main import main
from quantlab.store import RunStore


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, fmnist_model):
    root = tmp_path_factory.mktemp("fmnist")
    store, out = root / "runs.sqlite", root / "run"
    code = main([
        "compare", "--model", "examples/fmnist.py:build", "--data", "fmnist:calib[:200]", "--eval", "fmnist:test[:600]",
        "--metric", "top1", "--calibrators", "all", "--precisions", "fp32,fp16,int8", "--batch-size", "100",
        "--out", str(out), "--store", str(store),
    ])
    assert code == 0
    return store, out


def test_compare_rows_for_every_precision_and_calibrator(compare_run):
    store_path, out = compare_run
    store = RunStore(store_path)
    (run,) = store.list_runs("compare")
    assert run["status"] == "done" and run["eval_data"] == "fmnist:test[:600]"
    rows = [r for r in store.results(run["id"]) if r["metric"] == "top1"]
    keys = {(r["precision"], r["calibrator"]) for r in rows}
    assert keys == {("fp32", None), ("fp16", None)} | {("int8", c) for c in list_calibrators()}
    value = {(r["precision"], r["calibrator"]): r["value"] for r in rows}
    fp32 = value[("fp32", None)]
    assert 85.0 <= fp32 <= 100.0
    assert abs(value[("fp16", None)] - fp32) <= 0.3  # FP16 is essentially lossless here
    int8 = {c: value[("int8", c)] for c in list_calibrators()}
    assert fp32 - max(int8.values()) <= 1.0  # the best calibrator stays close to FP32
    assert all(30.0 <= v <= 100.0 for v in int8.values()), int8
    for r in rows:
        assert r["delta"] == pytest.approx(r["value"] - fp32) and r["seconds"] > 0
    layers = store.layer_stats(run["id"])
    assert {r["calibrator"] for r in layers} == set(list_calibrators())
    assert all(r["sqnr_db"] > 0 and 0 < r["cosine"] <= 1.0 and r["local_row_sqnr_db"] is not None for r in layers)
    files = {p.name for p in out.iterdir()}
    assert {"run.json", "results.json"} | {f"scales.{c}.json" for c in list_calibrators()} <= files
    results = json.loads((out / "results.json").read_text())
    assert results["best_calibrator"] in list_calibrators() and results["run_id"] == run["id"]
    assert {a["kind"] for a in store.artifacts(run["id"])} == {"scales", "results"}


def test_sensitivity_autoprecision_runs_and_report(compare_run, capsys):
    store_path, out = compare_run
    store = RunStore(store_path)
    capsys.readouterr()
    assert main(["sensitivity", "--run", str(out), "--calibrator", "entropy", "--store", str(store_path)]) == 0
    text = capsys.readouterr().out
    assert "everything but one" in text
    ranking = json.loads((out / "sensitivity.entropy.json").read_text())
    assert ranking["cost_passes"] <= 3.0 and ranking["method"] == "everything_but_one"
    assert len(ranking["layers"]) == 8 and ranking["total_batches"] == 6 and ranking["layers"][0]["sensitivity"] is not None

    # Reach the compare run by its id this time.
    compare_id = store.list_runs("compare")[0]["id"]
    code = main(["autoprecision", "--run", compare_id, "--calibrator", "entropy", "--max-drop", "1.0", "--store", str(store_path)])
    mixed = json.loads((out / "autoprecision.entropy" / "mixed.json").read_text())
    assert code == (0 if mixed["met"] else 3)
    assert mixed["fp32"] - mixed["value"] <= 1.0 or not mixed["met"]
    assert mixed["value"] >= mixed["int8"] or mixed["float_layers"] == []
    scales = json.loads((out / "autoprecision.entropy" / "scales.mixed.json").read_text())
    assert sorted(scales["float_layers"]) == sorted(mixed["float_layers"])
    assert not any(q["module"] in mixed["float_layers"] for q in scales["quantizers"])
    if mixed["float_layers"] and mixed["onnx_note"] is None:  # the Q/DQ export leaves the FP16 layers unquantized
        import onnx

        graph = onnx.load(str(out / "autoprecision.entropy" / "model.mixed.onnx")).graph
        producers = {o: n.op_type for n in graph.node for o in n.output}
        convs = {n.name: [producers.get(i) for i in n.input[:2]] for n in graph.node if n.op_type in ("Conv", "Gemm")}
        assert sum(1 for v in convs.values() if v[1] == "DequantizeLinear") == len(convs) - len(mixed["float_layers"])
    auto_run = store.list_runs("autoprecision")[0]
    assert auto_run["parent_id"] == compare_id and auto_run["status"] == "done"
    assert {r["source"] for r in store.results(auto_run["id"])} == {"ptq", "mixed"}

    capsys.readouterr()
    assert main(["runs", "--store", str(store_path)]) == 0
    listing = capsys.readouterr().out
    assert "compare" in listing and "sensitivity" in listing and "autoprecision" in listing
    assert main(["runs", "--show", compare_id, "--store", str(store_path)]) == 0
    assert "int8" in capsys.readouterr().out

    assert main(["report", "--run", str(out), "--store", str(store_path)]) == 0
    html = (out / "report.html").read_text()
    assert html.count("<svg") >= 3 and "Sensitivity ranking (entropy)" in html and "Mixed precision (entropy)" in html
    for calibrator in list_calibrators():
        assert f"{calibrator} amax" in html  # every calibrator's amax is marked on the histograms
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert main(["report", "--run", str(out), "--format", "md", "--store", str(store_path)]) == 0
    md = (out / "report.md").read_text()
    assert "| fp32 |" in md and (out / "report_files" / "sqnr.svg").is_file()
    assert {a["kind"] for a in store.artifacts(compare_id)} >= {"report"}
