"""The ort-cpu form: same scales, UINT8 activations, ONNX Runtime integer kernels, same outputs."""
import numpy as np
import onnx
import pytest
import torch

import quantlab as ql
from quantlab.export.graph import GraphView
from quantlab.export.qdq import export_int8
from quantlab.runtimes.onnxruntime_runner import quantized_kernels
from tests.export.helpers import ort_logits

# Measured on the 1,000 images: max |difference| 0.041 (logits span +-15), median 1e-6,
# top-1 identical. The integer kernels accumulate exactly where the TensorRT form's float
# Conv rounds, and such 1e-6 differences flip a rounding midpoint of the next quantizer
# now and then (one step of one activation).
MAX_FORM_DIFF = 0.2


def test_both_forms_give_the_same_outputs_on_real_images(exports, test_set):
    images, _ = test_set
    tensorrt_form = ort_logits(exports["int8"].path, images)
    ort_form = ort_logits(exports["int8_ort"].path, images)
    assert np.mean(tensorrt_form.argmax(1) == ort_form.argmax(1)) >= 0.998
    assert np.abs(tensorrt_form - ort_form).max() <= MAX_FORM_DIFF
    assert np.median(np.abs(tensorrt_form - ort_form).max(axis=1)) <= 1e-3


def test_ort_cpu_form_runs_integer_kernels(exports):
    kernels = quantized_kernels(exports["int8_ort"].path)
    rewrites = exports["int8_ort"].ort_cpu
    assert kernels.get("QLinearConv", 0) == rewrites["qlinear_conv"] == 5
    assert rewrites["matmul_integer"] == 1
    # Convs feeding a residual Add have no output quantizer: integer GEMM over im2col patches.
    assert rewrites["im2col_conv"] == 2 and rewrites["float_conv"] == 0
    assert kernels.get("MatMulInteger", 0) + kernels.get("MatMulIntegerToFloat", 0) == 3


def test_tensorrt_form_stays_float_in_onnx_runtime(exports):
    # ONNX Runtime fuses DQ -> Conv -> Q only; TensorRT's placement leaves conv outputs
    # unquantized, so ONNX Runtime runs that form with float kernels (correct, not fast).
    assert "QLinearConv" not in quantized_kernels(exports["int8"].path)


def test_ort_cpu_form_has_uint8_activations_and_int8_weights(exports):
    view = GraphView(onnx.load(str(exports["int8_ort"].path)))
    activation_zero_points, weight_zero_points = set(), set()
    for node in view.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = view.const(node.input[2])
            (activation_zero_points if view.const(node.input[0]) is None else weight_zero_points).add((zp.dtype.name, int(zp.reshape(-1)[0])))
    assert activation_zero_points == {("uint8", 128)}
    assert weight_zero_points <= {("int8", 0)}
    scales_trt = {n.name: float(view.const(n.input[1])) for n in view.nodes if n.op_type == "QuantizeLinear" and n.name.endswith("input_quantizer/QuantizeLinear")}
    trt_view = GraphView(onnx.load(str(exports["int8"].path)))
    for node in trt_view.nodes:
        if node.name in scales_trt:
            assert float(trt_view.const(node.input[1])) == scales_trt[node.name]  # same scales


@pytest.mark.parametrize("other_convs", ["im2col", "float", "conv-integer"])
def test_every_lowering_of_float_output_convs_computes_the_same(other_convs, tmp_path):
    """Strided, padded, dilated and 1x1 convs whose outputs feed a float Add (no QLinearConv)."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.b = torch.nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2)
            self.c = torch.nn.Conv2d(3, 8, 1, stride=2)
            self.d = torch.nn.Conv2d(3, 8, (3, 5), padding=(1, 2), stride=(2, 2))

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x) + self.d(x)

    model = Net().eval()
    x = torch.randn(8, 3, 11, 11)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    result = export_int8(model, tmp_path / f"{other_convs}.onnx", x, target="ort-cpu", ort_other_convs=other_convs)
    counts = result.ort_cpu
    key = {"im2col": "im2col_conv", "float": "float_conv", "conv-integer": "conv_integer"}[other_convs]
    assert counts[key] == 4 and counts["qlinear_conv"] == 0
    kernels = quantized_kernels(result.path)
    if other_convs == "im2col":
        assert kernels.get("MatMulInteger", 0) + kernels.get("MatMulIntegerToFloat", 0) == 4
    elif other_convs == "conv-integer":
        assert kernels.get("ConvInteger", 0) == 4
    reference = ort_logits(export_int8(model, tmp_path / "trt.onnx", x).path, x, batch=8)
    with torch.no_grad():
        assert np.abs(reference - model(x).numpy()).max() < 0.05
    np.testing.assert_allclose(ort_logits(result.path, x, batch=8), reference, atol=1e-4)


def test_unknown_lowering_is_refused(calibrated, tmp_path):
    with pytest.raises(Exception, match="ort_other_convs must be one of"):
        export_int8(calibrated[0], tmp_path / "m.onnx", torch.zeros(2, 1, 28, 28), target="ort-cpu", ort_other_convs="winograd")
