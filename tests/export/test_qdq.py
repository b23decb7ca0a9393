"""INT8 Q/DQ export of the calibrated demo CNN, checked in ONNX Runtime against PyTorch."""
import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import quantlab as ql
from quantlab.export.check import check_model
from quantlab.export.errors import ExportError
from quantlab.export.graph import GraphView
from quantlab.export.mapping import read_tensor_map
from quantlab.export.qdq import export_int8
from quantlab.functional import scale_from_amax
from tests.export.helpers import ort_logits

# Bounds on max |logit difference| between ONNX Runtime and the PyTorch fake-quantized
# model (logits span about +-15).
#
# Mirror export (no placement pass: same quantizers as PyTorch). FP32 ONNX Runtime and
# PyTorch agree to ~5e-6 (accumulation order). In INT8 such float differences flip the
# rounding of the ~1e-4 of activations that sit that close to a rounding midpoint, by
# exactly one step s = amax/127 each (ONNX's QuantizeLinear also divides by the scale
# where PyTorch multiplies by its inverse). A few flips per image give ~0.025 typical
# and ~0.1 worst-case logit differences (measured over 3,000 images); 0.35 leaves margin
# for other CPUs' accumulation orders.
MIRROR_MAX_LOGIT_DIFF = 0.35
# Default export: the placement pass also quantizes each residual skip with the scale
# calibrated for the block input (what TensorRT runs), which the PyTorch model keeps in
# float: +-s/2 rounding per element plus clipping of the rare values above the
# percentile amax. Measured worst case 0.42 on these 1,000 images.
PLACED_MAX_LOGIT_DIFF = 1.0


def qdq_nodes(model):
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_int8_export_passes_checker_and_quantlab_check(exports):
    result = exports["int8"]
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    report = check_model(result.path)
    assert report.errors == [] and report.warnings == [], report.findings
    assert report.num_weighted == report.num_weighted_quantized == 8
    assert result.opset >= 13
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic batch by default
    assert {p.key: p.value for p in model.metadata_props}["quantlab.target"] == "tensorrt"


def test_scales_and_zero_points_are_constants(exports):
    model = onnx.load(str(exports["int8"].path))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not [n.op_type for n in model.graph.node if n.op_type in ("Abs", "ReduceMax", "ReduceMin", "Div", "Clip")]
    nodes = qdq_nodes(model)
    assert len(nodes) == 8 * 2 + 8  # activation Q+DQ per layer, one weight DQ per layer
    for node in nodes:
        scale, zero_point = initializers[node.input[1]], initializers[node.input[2]]
        assert scale.dtype == np.float32 and np.all(scale > 0)
        assert zero_point.dtype == np.int8 and np.all(zero_point == 0)
    weights = [initializers[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    assert len(weights) == 8 and all(w.dtype == np.int8 and w.min() >= -127 for w in weights)


def _agreement(reference, path, images):
    logits = ort_logits(path, images)
    return 100.0 * np.mean(reference.argmax(1) == logits.argmax(1)), np.abs(reference - logits).max(axis=1)


def test_int8_onnx_agrees_with_pytorch_fake_quant(exports, torch_reference, test_set):
    agreement, diff = _agreement(torch_reference, exports["int8"].path, test_set[0])
    assert agreement >= 99.0, agreement
    assert diff.max() <= PLACED_MAX_LOGIT_DIFF, diff.max()


def test_mirror_export_matches_pytorch_up_to_rounding_flips(exports, torch_reference, test_set):
    assert check_model(exports["int8_mirror"].path).errors == []
    agreement, diff = _agreement(torch_reference, exports["int8_mirror"].path, test_set[0])
    assert agreement >= 99.5, agreement
    assert diff.max() <= MIRROR_MAX_LOGIT_DIFF, diff.max()
    assert np.median(diff) <= 0.06  # most images see only a few one-step rounding flips


def _top1(path, images, labels):
    return 100.0 * np.mean(ort_logits(path, images).argmax(1) == labels.numpy())


def test_int8_accuracy_within_one_point_of_fp32(exports, full_test_set):
    """All 10,000 test images. The INT8 model runs in its ort-cpu form (integer kernels,
    fast; ``auto``: a form exact on this CPU); test_ort_cpu shows it computes what the
    TensorRT form computes."""
    images, labels = full_test_set
    fp32 = _top1(exports["fp32"].path, images, labels)
    int8 = _top1(exports["int8_ort"].path, images, labels)
    assert fp32 >= 90.0
    assert fp32 - int8 <= 1.0, (fp32, int8)


@pytest.mark.slow
def test_tensorrt_form_accuracy_within_one_point_of_fp32(exports, full_test_set):
    images, labels = full_test_set
    fp32 = _top1(exports["fp32"].path, images, labels)
    assert fp32 - _top1(exports["int8"].path, images, labels) <= 1.0


def test_integer_weights_and_scales_equal_the_pytorch_quantizers(calibrated, test_set, tmp_path):
    model, _ = calibrated
    result = export_int8(model, tmp_path / "nofold.onnx", test_set[0][:2], fold_bn=False, placement=False)
    view = GraphView(onnx.load(str(result.path)))
    for ref in ql.iter_quantizers(model):
        tensor = result.tensor_map[ref.key]
        expected_scale = scale_from_amax(ref.quantizer.amax, ref.quantizer.spec).numpy()
        if ref.role == "weight":
            dq = next(n for n in view.uses(tensor) if n.op_type == "DequantizeLinear")
            fake_quantized = ref.module.weight.detach().numpy()  # PyTorch's fake-quantized weight
            shape = [-1] + [1] * (fake_quantized.ndim - 1)
            np.testing.assert_array_equal(view.const(tensor), np.rint(fake_quantized / expected_scale.reshape(shape)))
        else:
            dq = next(n for n in view.uses(tensor) if n.op_type == "QuantizeLinear")
        np.testing.assert_array_equal(view.const(dq.input[1]), expected_scale)


def test_residual_adds_read_the_quantized_skip(exports):
    view = GraphView(onnx.load(str(exports["int8"].path)))
    adds = [n for n in view.nodes if n.op_type == "Add"]
    assert len(adds) == 2
    for add in adds:
        producers = [view.producer[i].op_type for i in add.input]
        assert "DequantizeLinear" in producers and "Conv" in producers
    assert exports["int8"].placement["residual_quantized"] and not exports["int8"].placement["residual_left_float"]
    assert len(exports["int8"].folded_batchnorm) == 7


def test_tensor_map_names_graph_tensors_and_is_recorded(exports, calibrated):
    result = exports["int8"]
    model = onnx.load(str(result.path))
    view = GraphView(model)
    keys = {r.key for r in ql.iter_quantizers(calibrated[0])}
    assert set(result.tensor_map) == keys and result.unmapped == []
    for key, tensor in result.tensor_map.items():
        op = "QuantizeLinear" if key.endswith(":input") else "DequantizeLinear"
        assert any(n.op_type == op for n in view.uses(tensor)), key
    assert read_tensor_map(model) == result.tensor_map
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["tensor_map"] == result.tensor_map and sidecar["precision"] == "int8"
    assert "block1.conv1.input_quantizer/QuantizeLinear" in {n.name for n in model.graph.node}


class HFConv1DNet(nn.Module):
    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.proj = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight [8, 12]

    def forward(self, x):
        return self.proj(x)


OP_CASES = {
    # name: (model, input shape, ONNX op, expected weight DQ axis)
    "Conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)), (4, 3, 8, 8), "Conv", 0),
    "ConvTranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2)), (4, 3, 8, 8), "ConvTranspose", 1),
    "Linear": (lambda: nn.Sequential(nn.Linear(8, 12)), (4, 8), "Gemm", 0),
    "HF Conv1D": (HFConv1DNet, (4, 8), "Gemm", 1),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_qdq_attributes_per_op_type(case, tmp_path):
    build, shape, op_type, axis = OP_CASES[case]
    if case == "HF Conv1D":
        pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    result = export_int8(model, tmp_path / "m.onnx", x)
    onnx_model = onnx.load(str(result.path))
    view = GraphView(onnx_model)
    (node,) = [n for n in view.nodes if n.op_type == op_type]
    w_dq = view.producer[node.input[1]]
    x_dq = view.producer[node.input[0]]  # HF Conv1D's view() is moved in front of the DQ
    assert w_dq.op_type == x_dq.op_type == "DequantizeLinear"
    w_axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    out_channels = view.const(w_dq.input[0]).shape[w_axis]
    assert w_axis == axis and view.const(w_dq.input[1]).shape == (out_channels,)
    for dq in (w_dq, x_dq):
        zero_point = view.const(dq.input[2])
        assert zero_point.dtype == np.int8 and np.all(zero_point == 0) and np.all(view.const(dq.input[1]) > 0)
    assert view.const(x_dq.input[1]).shape == ()  # activations per tensor
    assert check_model(onnx_model).errors == []
    with torch.no_grad():
        reference = model(x).numpy()
    np.testing.assert_allclose(ort_logits(result.path, x, batch=len(x)), reference, atol=2e-2)


@pytest.mark.slow  # the dynamo exporter alone takes ~15 s on 2 cores
def test_dynamo_exporter_gives_the_same_model(calibrated, exports, test_set, tmp_path):
    model, _ = calibrated
    images = test_set[0][:200]
    result = export_int8(model, tmp_path / "dynamo.onnx", images[:2], exporter="dynamo")
    assert result.exporter == "dynamo" and result.opset >= 18
    assert check_model(result.path).errors == []
    a, b = ort_logits(result.path, images), ort_logits(exports["int8"].path, images)
    np.testing.assert_allclose(a, b, atol=1e-4)  # same Q/DQ placement, scales and integer weights
    assert set(result.tensor_map) == set(exports["int8"].tensor_map)


# -- bad input ---------------------------------------------------------------------------------

def test_uncalibrated_layers_are_named_and_nothing_is_written(fp32_model, tmp_path):
    model = copy.deepcopy(fp32_model)
    ql.quantize(model)  # quantizers attached, never calibrated
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="no activation scale: stem.0, down1.0"):
        export_int8(model, out, torch.zeros(2, 1, 28, 28))
    assert list(tmp_path.iterdir()) == []


def test_unquantized_model_is_refused(fp32_model, tmp_path):
    with pytest.raises(ExportError, match="has no quantizers"):
        export_int8(copy.deepcopy(fp32_model), tmp_path / "m.onnx", torch.zeros(2, 1, 28, 28))


def test_non_int8_quantizers_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    config = ql.int8_config("max").replace(weight=ql.QuantizerSpec(num_bits=4, narrow_range=True, per_channel=True))
    x = torch.randn(8, 4)
    ql.quantize(model, config, forward_loop=lambda m: m(x))
    with pytest.raises(ExportError, match="'0:weight' uses 4 bits"):
        export_int8(model, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx").exists()
