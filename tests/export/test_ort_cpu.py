"""The ort-cpu form: same scales, UINT8 activations, ONNX Runtime integer kernels, same outputs.

Every form is tested forced (u8s8, u8u8, qdq-float) so no test depends on the CPU;
the default export (``--ort-int8 auto``) is whichever form is exact here.
"""
import numpy as np
import onnx
import pytest
import torch

import quantlab as ql
from quantlab.runtimes.onnxruntime import forms as ort_forms
from quantlab.runtimes.onnxruntime.forms import OrtFormError
from quantlab.export.graph import GraphView
from quantlab.export.qdq import export_int8
from quantlab.runtimes.onnxruntime.runner import quantized_kernels
from tests.export.helpers import ort_logits

# The TensorRT form runs in ONNX Runtime with float kernels (its Q/DQ rounding emulated, QDQ
# fusion off); the integer forms accumulate exactly and QLinearConv adds the bias as int32
# rounded to s_x * s_w. So an activation at a rounding midpoint of the next quantizer flips
# by one step now and then (about s_x * s_w / s_y ~ 1e-3 of the activations of the first
# layers). Measured on the 1,000 images: max |difference| 0.095 (logits span +-15), median
# per-image max 0.025, top-1 agreement 99.9%. The median bound is the one-step-flip bound
# of the mirror export (test_qdq); the max leaves 2x margin.
MAX_FORM_DIFF = 0.2
MEDIAN_FORM_DIFF = 0.06


@pytest.fixture(scope="module")
def forced(calibrated, test_set, tmp_path_factory):
    """The demo CNN's ort-cpu export in each form, forced."""
    out = tmp_path_factory.mktemp("forms")
    return {form: export_int8(calibrated[0], out / f"model.{form}.onnx", test_set[0][:2], target="ort-cpu", ort_int8=form)
            for form in ("u8s8", "u8u8", "qdq-float")}


def test_both_forms_give_the_same_outputs_on_real_images(exports, test_set):
    images, _ = test_set
    tensorrt_form = ort_logits(exports["int8"].path, images)
    ort_form = ort_logits(exports["int8_ort"].path, images)  # auto: a form exact on this CPU
    assert np.mean(tensorrt_form.argmax(1) == ort_form.argmax(1)) >= 0.998
    assert np.abs(tensorrt_form - ort_form).max() <= MAX_FORM_DIFF
    assert np.median(np.abs(tensorrt_form - ort_form).max(axis=1)) <= MEDIAN_FORM_DIFF


def test_exact_forms_give_identical_integers_and_qdq_float_is_the_tensorrt_form(forced, exports, test_set):
    images = test_set[0][:500]
    u8u8 = ort_logits(forced["u8u8"].path, images)
    if ort_forms.cached_probe().exact("u8s8"):
        # u8 x s8 and u8 x (s8 + 128) with zero point 128 are the same integers when both are exact.
        np.testing.assert_array_equal(ort_logits(forced["u8s8"].path, images), u8u8)
    else:
        with pytest.raises(OrtFormError, match="u8s8 is not exact on this CPU"):
            ort_logits(forced["u8s8"].path, images)
    # qdq-float: the same float values and float kernels as the TensorRT form run by ONNX Runtime.
    np.testing.assert_allclose(ort_logits(forced["qdq-float"].path, images), ort_logits(exports["int8"].path, images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["u8s8", "u8u8"])
def test_ort_cpu_form_runs_integer_kernels(form, forced):
    kernels = quantized_kernels(forced[form].path)  # reads the optimized graph; computes nothing
    rewrites = forced[form].ort_cpu
    assert kernels.get("QLinearConv", 0) == rewrites["qlinear_conv"] == 5
    assert rewrites["matmul_integer"] == 1
    # Convs feeding a residual Add have no output quantizer: integer GEMM over im2col patches.
    assert rewrites["im2col_conv"] == 2 and rewrites["float_conv"] == 0
    assert kernels.get("MatMulInteger", 0) + kernels.get("MatMulIntegerToFloat", 0) == 3
    assert rewrites["uint8_weights"] == (8 if form == "u8u8" else 0)


def test_qdq_float_form_runs_no_integer_kernel(forced):
    assert quantized_kernels(forced["qdq-float"].path) == {}
    assert forced["qdq-float"].ort_cpu["float_conv"] == 7 and forced["qdq-float"].ort_cpu["float_matmul"] == 1


def test_the_form_is_recorded_in_the_file_and_the_sidecar(forced, exports):
    for form, result in forced.items():
        meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
        assert meta["quantlab.ort_int8"] == form and meta["quantlab.ort_int8.requested"] == form
        assert meta["quantlab.ort_int8.weight_bits"] == "8" and "onnxruntime" in meta["quantlab.ort_int8.chosen_on"]
        assert result.ort_int8["form"] == form
    auto = exports["int8_ort"].ort_int8
    assert auto["requested"] == "auto" and auto["exact_here"] and auto["form"] == ort_forms.choose_form(ort_forms.cached_probe())
    assert "quantlab.ort_int8" not in {p.key for p in onnx.load(str(exports["int8"].path)).metadata_props}


def test_tensorrt_form_stays_float_in_onnx_runtime(exports):
    # ONNX Runtime fuses DQ -> Conv -> Q only; TensorRT's placement leaves conv outputs
    # unquantized, so ONNX Runtime runs that form with float kernels (correct, not fast).
    assert "QLinearConv" not in quantized_kernels(exports["int8"].path)


def test_ort_cpu_form_has_uint8_activations_and_int8_weights(forced, exports):
    view = GraphView(onnx.load(str(forced["u8s8"].path)))
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


def test_u8u8_form_stores_the_same_weights_plus_128(forced):
    def integer_weights(path):
        view = GraphView(onnx.load(str(path)))
        return {name: view.const(name) for name in view.initializers
                if view.const(name).ndim >= 2 and view.const(name).dtype in (np.int8, np.uint8)}

    signed, unsigned = integer_weights(forced["u8s8"].path), integer_weights(forced["u8u8"].path)
    assert len(signed) == len(unsigned) == 8
    assert all(w.dtype == np.int8 for w in signed.values()) and all(w.dtype == np.uint8 for w in unsigned.values())
    for name, w in signed.items():
        np.testing.assert_array_equal(unsigned[f"{name}_uint8"].astype(np.int16) - 128, w)


@pytest.mark.parametrize("form", ["u8s8", "u8u8"])
@pytest.mark.parametrize("other_convs", ["im2col", "float", "conv-integer"])
def test_every_lowering_of_float_output_convs_computes_the_same(other_convs, form, tmp_path):
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
    result = export_int8(model, tmp_path / f"{other_convs}.onnx", x, target="ort-cpu", ort_other_convs=other_convs, ort_int8=form)
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
    if form == "u8s8" and not ort_forms.cached_probe().exact("u8s8"):
        with pytest.raises(OrtFormError, match="u8s8 is not exact on this CPU"):
            ort_logits(result.path, x, batch=8)
        return
    # No quantizer after these convs: only float rounding of the sums differs (~1e-6).
    np.testing.assert_allclose(ort_logits(result.path, x, batch=8), reference, atol=1e-4)


def test_unknown_lowering_is_refused(calibrated, tmp_path):
    with pytest.raises(Exception, match="ort_other_convs must be one of"):
        export_int8(calibrated[0], tmp_path / "m.onnx", torch.zeros(2, 1, 28, 28), target="ort-cpu", ort_other_convs="winograd")
