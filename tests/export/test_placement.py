"""The placement pass on hand-built graphs: Pad, Concat, residual Add; numerics checked in ONNX Runtime."""
import numpy as np
import onnx
import onnxruntime as ort

from quantlab.export.check import check_model, findings_for
from quantlab.export.graph import GraphView
from quantlab.export.placement import apply_placement
from tests.export.graphs import C, GraphBuilder


def run(model, x):
    # Q/DQ in float, as TensorRT's numerics prescribe (with its QDQ fusion on, ONNX Runtime runs
    # u8 x s8 integer kernels, whose results depend on the CPU).
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def placed(model):
    view = GraphView(onnx.ModelProto.FromString(model.SerializeToString()))
    report = apply_placement(view)
    return view.commit(), report


def test_pad_qdq_moved_in_front_of_pad_without_changing_outputs():
    b = GraphBuilder()
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    padded = b.node("Pad", [b.node("Relu", ["input"]), pads], name="pad")
    out = b.node("Conv", [b.qdq(padded, scale=0.02), b.weight_dq()])
    model = b.model(["input"], [out])
    new, report = placed(model)
    assert report.pad_moved == ["pad"]
    assert findings_for(check_model(model), "qdq-between-pad-and-conv")
    assert not findings_for(check_model(new), "qdq-between-pad-and-conv")
    pad = next(n for n in new.graph.node if n.op_type == "Pad")
    assert GraphView(new).producer[pad.input[0]].op_type == "DequantizeLinear"
    x = np.random.default_rng(1).standard_normal((1, C, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(model, x), run(new, x))  # zero padding commutes with quantization


def test_pad_with_nonzero_constant_is_left_alone():
    b = GraphBuilder()
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    padded = b.node("Pad", ["input", pads, b.const(np.array(0.013, np.float32))], name="pad")
    out = b.node("Conv", [b.qdq(padded), b.weight_dq()])
    _, report = placed(b.model(["input"], [out]))
    assert report.pad_moved == []


def test_concat_inputs_get_the_max_scale():
    b = GraphBuilder()
    a = b.qdq(b.node("Relu", ["input"]), scale=0.05)
    c = b.qdq(b.node("Sigmoid", ["input"]), scale=0.01)
    cat = b.node("Concat", [a, c], name="cat", axis=1)
    model = b.model(["input"], [cat], out_shape=(1, 2 * C, 8, 8))
    new, report = placed(model)
    assert report.concat_unified == ["cat"]
    view = GraphView(new)
    concat = next(n for n in view.nodes if n.op_type == "Concat")
    scales = {float(view.const(view.producer[i].input[1])) for i in concat.input}
    assert scales == {np.float32(0.05)}
    assert not findings_for(check_model(new), "concat-scale-mismatch")


def test_concat_keeps_other_consumers_scale():
    b = GraphBuilder()
    a = b.qdq(b.node("Relu", ["input"]), scale=0.05)
    c = b.qdq(b.node("Sigmoid", ["input"]), scale=0.01)
    conv = b.node("Conv", [c, b.weight_dq()], pads=[1, 1, 1, 1])  # also reads c's DQ
    cat = b.node("Concat", [a, c], axis=1)
    model = b.model(["input"], [cat, conv], out_shape=(1, 2 * C, 8, 8))
    new, _ = placed(model)
    view = GraphView(new)
    conv_node = next(n for n in view.nodes if n.op_type == "Conv")
    assert float(view.const(view.producer[conv_node.input[0]].input[1])) == np.float32(0.01)


def test_residual_skip_reuses_the_existing_quantizer():
    b = GraphBuilder()
    x = b.node("Relu", ["input"])
    conv1 = b.node("Relu", [b.node("Conv", [b.qdq(x, scale=0.03, name="block_in"), b.weight_dq()], pads=[1, 1, 1, 1])])
    conv2 = b.node("Conv", [b.qdq(conv1), b.weight_dq()], pads=[1, 1, 1, 1])
    add = b.node("Add", [conv2, x], name="add")
    model = b.model(["input"], [b.node("Relu", [add])])
    new, report = placed(model)
    assert report.residual_quantized == ["add"]
    view = GraphView(new)
    add_node = next(n for n in view.nodes if n.op_type == "Add")
    assert view.producer[add_node.input[1]].name == "block_in_dq"
    assert not findings_for(check_model(new), "residual-not-quantized")


def test_residual_without_calibrated_scale_is_reported():
    b = GraphBuilder()
    x = b.node("Relu", ["input"])  # x feeds only the Add: no quantizer was calibrated on it
    conv = b.node("Conv", [b.qdq(b.node("Sigmoid", ["input"])), b.weight_dq()], pads=[1, 1, 1, 1])
    add = b.node("Add", [conv, x], name="add")
    _, report = placed(b.model(["input"], [add]))
    assert report.residual_quantized == [] and report.residual_left_float[0].startswith("add")
