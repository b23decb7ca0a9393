"""The compare job's deployment cost: timed on the EXPORTED ONNX files in ONNX Runtime, never on the
PyTorch model; n / intervals / paired tests and output fidelity recorded beside the accuracy."""
import collections
import hashlib

import onnx
import pytest

from quantlab.jobs.compare import run_compare
from quantlab.jobs.deployment import DeploymentOptions
from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner
from quantlab.runtimes.tensorrt.loader import tensorrt_available
from quantlab.store import RunStore


def test_latency_is_measured_on_the_exported_file(planted, tmp_path, monkeypatch):
    model, calib, evaluation = planted
    runs = collections.Counter()
    files = {}
    original = OnnxRuntimeRunner.run

    def counted(self, inputs):
        # What ONNX Runtime actually runs: the file's hash and its graph's format at the moment it is timed.
        data = self.path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        fmt = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}.get("quantlab.format")
        files[sha] = fmt
        runs[(sha, int(next(iter(self.feeds(inputs).values())).shape[0]))] += 1
        return original(self, inputs)

    monkeypatch.setattr(OnnxRuntimeRunner, "run", counted)
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_compare(model, calib, evaluation, calibrators="max,percentile", layer_batches=0, store=store,
                         deployment=DeploymentOptions(threads=1, warmup=1, repeats=2))
    rows = store.deployment(result.run_id)
    measured = [r for r in rows if r["status"] == "measured"]
    batch = int(evaluation[0][0].shape[0])
    expected = {("fp32", None), ("fp16", None), ("int8", "max"), ("int8", "percentile")}
    assert {(r["precision"], r["calibrator"]) for r in measured} == expected
    assert {r["batch_size"] for r in measured} == {1, batch}
    for row in measured:
        # The recorded file is the one ONNX Runtime ran, warmup + repeats times at that batch size.
        assert runs[(row["onnx_sha256"], row["batch_size"])] == 1 + 2
        assert files[row["onnx_sha256"]] == {"fp32": "fp32", "fp16": "fp16", "int8": "qdq-int8"}[row["precision"]]
        assert row["label"].startswith("onnxruntime-cpu ") and row["label"].endswith("1 thread")
        assert 0 < row["latency_ms_min"] <= row["latency_ms_median"] and row["size_mb"] > 0
    int8 = next(r for r in measured if r["precision"] == "int8")
    assert int8["label"].split(",")[0].split()[1] in ("u8s8", "u8u8", "qdq-float")  # the exact form chosen for this CPU
    fp32_size = next(r["size_mb"] for r in measured if r["precision"] == "fp32")
    assert int8["size_mb"] < fp32_size
    trt = [r for r in rows if r["runtime"] == "tensorrt"]
    expected_trt = "not measured" if tensorrt_available() else "not installed"  # never a number from this CPU step
    assert len(trt) == 4 and all(r["status"] == expected_trt and r["latency_ms_median"] is None for r in trt)
    assert [r.to_dict() for r in result.deployment] == rows
    assert store.get_run(result.run_id)["config"]["deployment"] == {"threads": 1, "warmup": 1, "repeats": 2}


def test_noise_and_fidelity_are_recorded_beside_the_accuracy(planted, tmp_path):
    model, calib, evaluation = planted
    store = RunStore(tmp_path / "runs.sqlite")
    result = run_compare(model, calib, evaluation, calibrators="max", precisions="fp32,int8", layer_batches=0, store=store,
                         deployment=DeploymentOptions(enabled=False))
    samples = sum(int(b[1].shape[0]) for b in evaluation)
    rows = {(r["precision"], r["metric"]): r for r in store.results(result.run_id)}
    fp32, int8 = rows[("fp32", "top1")], rows[("int8", "top1")]
    assert fp32["n"] == int8["n"] == samples and fp32["paired_test"] is None
    assert fp32["ci_low"] <= fp32["value"] <= fp32["ci_high"] and int8["ci_low"] <= int8["value"] <= int8["ci_high"]
    assert int8["paired_test"].startswith("McNemar") and int8["within_noise"] is False  # the planted outlier: far outside
    (fidelity,) = store.fidelity(result.run_id)
    assert fidelity["n"] == samples and fidelity["top1_agreement"] == pytest.approx(rows[("int8", "top1_agreement")]["value"])
    assert fidelity["max_abs_error"] > 0 and 0 < fidelity["one_minus_cosine"] < 1
    assert store.deployment(result.run_id) == []
