"""The ort-cpu form: same scales, UINT8 activations, ONNX Runtime integer kernels, same outputs."""
import numpy as np
import onnx
import torch

import quantlab as ql
from quantlab.export.graph import GraphView
from quantlab.export.qdq import export_int8
from quantlab.runtimes.onnxruntime_runner import quantized_kernels
from tests.export.helpers import ort_logits

# Measured on the 1,000 images: max |difference| 0.018 (logits span +-15), top-1 identical.
# The integer kernels accumulate exactly where the TensorRT form's float Conv rounds, and
# such 1e-6 differences flip a rounding midpoint of the next quantizer now and then.
MAX_FORM_DIFF = 0.2


def test_both_forms_give_the_same_outputs_on_real_images(exports, test_set):
    images, _ = test_set
    tensorrt_form = ort_logits(exports["int8"].path, images)
    ort_form = ort_logits(exports["int8_ort"].path, images)
    assert np.mean(tensorrt_form.argmax(1) == ort_form.argmax(1)) >= 0.998
    assert np.abs(tensorrt_form - ort_form).max() <= MAX_FORM_DIFF
    assert np.median(np.abs(tensorrt_form - ort_form).max(axis=1)) <= 0.02


def test_ort_cpu_form_runs_integer_kernels(exports):
    kernels = quantized_kernels(exports["int8_ort"].path)
    rewrites = exports["int8_ort"].ort_cpu
    assert kernels.get("QLinearConv", 0) == rewrites["qlinear_conv"] == 5
    assert kernels.get("MatMulInteger", 0) + kernels.get("MatMulIntegerToFloat", 0) == rewrites["matmul_integer"] == 1
    # Convs feeding a residual Add have no output quantizer: exact numerics keep them float.
    assert rewrites["float_conv"] == 2


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


def test_conv_integer_option_is_exact_integer_arithmetic(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.randn(16, 3, 10, 10)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    plain = export_int8(model, tmp_path / "plain.onnx", x, target="ort-cpu")
    integer = export_int8(model, tmp_path / "int.onnx", x, target="ort-cpu", conv_integer=True)
    assert integer.ort_cpu["conv_integer"] >= 1 and quantized_kernels(integer.path).get("ConvInteger", 0) >= 1
    reference = ort_logits(export_int8(model, tmp_path / "trt.onnx", x).path, x, batch=16)
    for result in (plain, integer):
        np.testing.assert_allclose(ort_logits(result.path, x, batch=16), reference, atol=1e-3)
