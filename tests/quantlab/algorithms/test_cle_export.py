"""A cross-layer-equalized INT8 model exports to a Q/DQ ONNX that passes the TensorRT placement
check and matches PyTorch fake quantization in ONNX Runtime (per-channel clamps become Min/Max)."""
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import quantlab  # noqa: E402
from quantlab.config import int8_config  # noqa: E402
from tests.export.helpers import assert_exports_and_matches_onnxruntime  # noqa: E402
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
    assert_exports_and_matches_onnxruntime(model, data, tmp_path / "cle.int8.onnx")
