"""Shared helpers of the export tests: logits from PyTorch and from ONNX Runtime."""
import numpy as np
import torch


def torch_logits(model, images, batch=500):
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()


def ort_logits(path, images, batch=500, threads=2):
    from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, threads=threads) as runner:
        return np.concatenate([runner.run(images[i : i + batch].numpy())[0] for i in range(0, len(images), batch)])


def assert_exports_and_matches_onnxruntime(model, data, path):
    """Exports the quantized ``model`` to a Q/DQ ONNX at ``path``: it passes the TensorRT placement check,
    and ONNX Runtime's outputs on ``data`` (a list of batches) match PyTorch fake quantization within 2%
    of the largest output (rounding ties may fall the other way between the two)."""
    from quantlab.export.check import check_model
    from quantlab.export.qdq import export_int8

    result = export_int8(model, path, data[0][:2])
    report = check_model(result.path)
    assert report.ok, [str(f) for f in report.errors]
    with torch.no_grad():
        expected = torch.cat([model(x) for x in data]).numpy()
    got = ort_logits(result.path, torch.cat(data))
    assert np.abs(got - expected).max() < 2e-2 * max(1.0, float(np.abs(expected).max()))
