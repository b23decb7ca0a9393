"""A cross-layer-equalized INT8 model exports to a Q/DQ ONNX that passes the TensorRT placement
check and matches PyTorch fake quantization in ONNX Runtime (per-channel clamps become Min/Max)."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import quantlab  # noqa: E402
from quantlab.config import int8_config  # noqa: E402
from quantlab.export.check import check_model  # noqa: E402
from quantlab.export.qdq import export_int8  # noqa: E402
from tests.export.helpers import ort_logits  # noqa: E402
from tests.quantlab.algorithms.nets import MobileBlockNet  # noqa: E402


def test_equalized_model_exports_and_matches_in_onnxruntime(tmp_path):
    model = MobileBlockNet(relu6_shared=True)
    g = torch.Generator().manual_seed(8)
    data = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(3)]

    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    quantlab.quantize(model, int8_config("max").replace(algorithms=("cle",)), forward_loop=loop)
    result = export_int8(model, tmp_path / "cle.int8.onnx", data[0][:2])
    report = check_model(result.path)
    assert report.ok, [str(f) for f in report.errors]
    with torch.no_grad():
        expected = torch.cat([model(x) for x in data]).numpy()
    got = ort_logits(result.path, torch.cat(data))
    assert np.abs(got - expected).max() < 2e-2 * max(1.0, float(np.abs(expected).max()))
