"""Deployment cost of an exported ONNX file (quantlab.evaluation.cost): timed in ONNX Runtime on that file."""
import collections
import copy
import hashlib

import pytest
import torch
from torch import nn

from quantlab.api import load_scales
from quantlab.evaluation.cost import FAILED, MEASURED, file_sha256, first_samples, measure_onnxruntime
from quantlab.export.float import export_float
from quantlab.export.qdq import export_int8
from quantlab.ptq import run_ptq
from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_each_batch_size_is_timed_warmup_plus_repeats_times_on_the_file(tmp_path, monkeypatch):
    model, x = _model(), torch.randn(8, 16)
    path = export_float(model, tmp_path / "m.onnx", x, sidecar=False).path
    calls = collections.Counter()
    original = OnnxRuntimeRunner.run

    def counted(self, inputs):
        calls[(str(self.path), int(next(iter(self.feeds(inputs).values())).shape[0]))] += 1
        return original(self, inputs)

    monkeypatch.setattr(OnnxRuntimeRunner, "run", counted)
    rows = measure_onnxruntime(path, x, precision="fp32", batch_sizes=(1, 8, 64), threads=1, warmup=2, repeats=3)
    # 64 > the 8 samples given: timed at 8, once.
    assert [(r.batch_size, r.status) for r in rows] == [(1, MEASURED), (8, MEASURED)]
    assert calls == {(str(path), 1): 5, (str(path), 8): 5}
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(r.onnx_sha256 == sha == file_sha256(path) and r.onnx_file == path.name for r in rows)
    assert all(r.size_mb == pytest.approx(path.stat().st_size / 1e6) and r.label == "onnxruntime-cpu fp32, 1 thread" for r in rows)
    assert all(0 < r.latency_ms_min <= r.latency_ms_median and r.repeats == 3 and r.warmup == 2 for r in rows)


@pytest.mark.parametrize("form", ["u8s8", "u8u8", "qdq-float"])
def test_the_int8_label_names_the_form_in_the_file(tmp_path, form):
    from quantlab.runtimes.onnxruntime.forms import cached_probe

    model, x = _model(), torch.randn(8, 16)
    quant = copy.deepcopy(model)
    ptq = run_ptq(quant, [(x, None)], ["max"])
    load_scales(quant, ptq.scales["max"])
    path = export_int8(quant, tmp_path / f"{form}.onnx", x, target="ort-cpu", ort_int8=form, sidecar=False).path
    rows = measure_onnxruntime(path, x, precision="int8", calibrator="max", threads=2, warmup=1, repeats=1)
    if cached_probe().exact(form, 8):
        assert rows[0].status == MEASURED and rows[0].label == f"onnxruntime-cpu {form}, 2 threads"
    else:  # a form that is not exact on this CPU is refused, with the reason, never timed
        assert rows[0].status == FAILED and rows[0].latency_ms_median is None and rows[0].note


def test_a_file_onnx_runtime_refuses_gives_a_failed_row(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx model")
    (row,) = measure_onnxruntime(path, torch.randn(2, 16), precision="fp32")
    assert row.status == FAILED and row.latency_ms_median is None and row.note


def test_first_samples_slices_every_tensor():
    batch = {"a": torch.zeros(4, 3), "b": (torch.ones(4), torch.ones(4, 2))}
    out = first_samples(batch, 1)
    assert out["a"].shape == (1, 3) and out["b"][0].shape == (1,) and out["b"][1].shape == (1, 2)
