"""`quantlab check`: one hand-built graph per rule, plus the CLI exit codes."""
import numpy as np
import onnx
import pytest

from quantlab.cli.main import main
from quantlab.export.check import ERROR, RULES, WARNING, check_model, findings_for
from tests.export.graphs import C, GraphBuilder, good_conv_model


def rules(model):
    return {f.rule for f in check_model(model).findings}


def test_clean_graph_has_no_findings():
    report = check_model(good_conv_model())
    assert report.findings == []
    assert report.ok and report.num_weighted == 2 and report.num_weighted_quantized == 2


def test_every_rule_has_a_severity():
    assert set(RULES.values()) <= {ERROR, WARNING, "info"}


def test_opset_too_low():
    b = GraphBuilder(opset=10)
    s = b.const(np.array(0.05, np.float32))
    z = b.const(np.array(0, np.int8))
    out = b.node("DequantizeLinear", [b.node("QuantizeLinear", ["input", s, z]), s, z])
    report = check_model(b.model(["input"], [out]))
    assert [f.severity for f in findings_for(report, "opset-too-low")] == [ERROR]
    assert not report.ok


def test_non_constant_scale_computed_in_graph():
    b = GraphBuilder()
    # scale = ReduceMax(Abs(x)) / 127: what a naive export of dynamic ranges produces
    amax = b.node("ReduceMax", [b.node("Abs", ["input"])], keepdims=0)
    scale = b.node("Div", [amax, b.const(np.array(127.0, np.float32))])
    z = b.const(np.array(0, np.int8))
    q = b.node("QuantizeLinear", ["input", scale, z], name="dynamic_q")
    out = b.node("DequantizeLinear", [q, scale, z])
    report = check_model(b.model(["input"], [out]))
    hit = findings_for(report, "non-constant-qparams")
    assert any(f.node == "dynamic_q" and "Div" in f.message for f in hit)
    assert not report.ok


def test_scale_not_positive():
    b = GraphBuilder()
    out = b.qdq("input", scale=0.0, name="zero_scale")
    report = check_model(b.model(["input"], [out]))
    assert {f.node for f in findings_for(report, "scale-not-positive")} == {"zero_scale_q", "zero_scale_dq"}


def test_asymmetric_zero_point():
    b = GraphBuilder()
    y = b.qdq("input", zero_point=np.int8(3), name="asym")
    out = b.node("Conv", [y, b.weight_dq()], pads=[1, 1, 1, 1])
    report = check_model(b.model(["input"], [out]))
    hit = findings_for(report, "asymmetric-zero-point")
    assert {f.node for f in hit} == {"asym_q", "asym_dq"} and all(f.severity == ERROR for f in hit)


def test_uint8_inside_network_but_not_at_the_input():
    b = GraphBuilder()
    x = b.qdq("input", zero_point=np.uint8(0), name="at_input")  # UINT8 on a network input: allowed
    y = b.node("Relu", [b.node("Conv", [x, b.weight_dq()], pads=[1, 1, 1, 1])])
    inner = b.qdq(y, zero_point=np.uint8(0), name="inner")
    out = b.node("Conv", [inner, b.weight_dq()], pads=[1, 1, 1, 1])
    report = check_model(b.model(["input"], [out]))
    nodes = {f.node for f in findings_for(report, "uint8-inside-network")}
    assert "inner_q" in nodes and "at_input_q" not in nodes


def test_missing_zero_point_means_uint8():
    b = GraphBuilder()
    y = b.node("Relu", ["input"])
    s = b.const(np.array(0.05, np.float32))
    q = b.node("QuantizeLinear", [y, s], name="no_zp")
    out = b.node("Conv", [b.node("DequantizeLinear", [q, s]), b.weight_dq()], pads=[1, 1, 1, 1])
    hit = findings_for(check_model(b.model(["input"], [out])), "uint8-inside-network")
    assert any(f.node == "no_zp" and "no zero point" in f.message for f in hit)


def test_per_channel_activation():
    b = GraphBuilder()
    s = b.const(np.full(C, 0.05, np.float32))
    z = b.const(np.zeros(C, np.int8))
    q = b.node("QuantizeLinear", ["input", s, z], name="pc_act", axis=1)
    out = b.node("Conv", [b.node("DequantizeLinear", [q, s, z], axis=1), b.weight_dq()], pads=[1, 1, 1, 1])
    hit = findings_for(check_model(b.model(["input"], [out])), "per-channel-activation")
    assert any(f.node == "pc_act" for f in hit)


def test_weight_axis_wrong_for_conv():
    b = GraphBuilder()
    w = b.weight_dq(shape=(C, C, 3, 3), axis=1)  # input channels: wrong for Conv
    out = b.node("Conv", [b.qdq("input"), w], name="conv_bad_axis", pads=[1, 1, 1, 1])
    hit = findings_for(check_model(b.model(["input"], [out])), "weight-axis")
    assert [f.node for f in hit] == ["conv_bad_axis"] and "axis 1" in hit[0].message and "axis 0" in hit[0].message


def test_weight_axis_right_for_convtranspose():
    b = GraphBuilder()
    w = b.weight_dq(shape=(C, 2 * C, 3, 3), axis=1)  # ConvTranspose: [in, out, kh, kw]
    out = b.node("ConvTranspose", [b.qdq("input"), w], pads=[1, 1, 1, 1])
    assert "weight-axis" not in rules(b.model(["input"], [out], out_shape=(1, 2 * C, 8, 8)))


def test_weighted_input_not_quantized():
    b = GraphBuilder()
    y = b.node("Relu", [b.conv("input")])
    out = b.conv(y, quantize_input=False, name="float_conv")
    hit = findings_for(check_model(b.model(["input"], [out])), "weighted-input-not-quantized")
    assert [f.node for f in hit] == ["float_conv"] and hit[0].severity == WARNING


def test_residual_not_quantized():
    b = GraphBuilder()
    x = b.node("Relu", ["input"])
    branch = b.conv(b.node("Relu", [b.conv(x)]))
    add = b.node("Add", [branch, x], name="residual_add")
    report = check_model(b.model(["input"], [b.node("Relu", [add])]))
    assert [f.node for f in findings_for(report, "residual-not-quantized")] == ["residual_add"]


def test_residual_quantized_skip_is_clean():
    b = GraphBuilder()
    x = b.node("Relu", ["input"])
    skip = b.qdq(x)
    branch = b.node("Conv", [skip, b.weight_dq()], pads=[1, 1, 1, 1])
    add = b.node("Add", [branch, skip])
    assert "residual-not-quantized" not in rules(b.model(["input"], [add]))


def test_concat_scale_mismatch():
    b = GraphBuilder()
    a = b.qdq(b.node("Relu", ["input"]), scale=0.05)
    c = b.qdq(b.node("Sigmoid", ["input"]), scale=0.01)
    cat = b.node("Concat", [a, c], name="cat", axis=1)
    hit = findings_for(check_model(b.model(["input"], [cat], out_shape=(1, 2 * C, 8, 8))), "concat-scale-mismatch")
    assert [f.node for f in hit] == ["cat"]


def test_qdq_between_pad_and_conv():
    b = GraphBuilder()
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    padded = b.node("Pad", ["input", pads])
    y = b.qdq(padded, name="after_pad")
    out = b.node("Conv", [y, b.weight_dq()])
    hit = findings_for(check_model(b.model(["input"], [out])), "qdq-between-pad-and-conv")
    assert [f.node for f in hit] == ["after_pad_q"]


def test_qdq_splits_conv_relu_fusion():
    b = GraphBuilder()
    conv = b.conv("input")
    split = b.qdq(conv, name="split")
    out = b.node("Relu", [split])
    hit = findings_for(check_model(b.model(["input"], [out])), "qdq-splits-fusion")
    assert [f.node for f in hit] == ["split_q"]


def test_unpaired_quantize():
    b = GraphBuilder()
    s = b.const(np.array(0.05, np.float32))
    z = b.const(np.array(0, np.int8))
    q = b.node("QuantizeLinear", ["input", s, z], name="lonely")
    out = b.node("Cast", [q], to=onnx.TensorProto.FLOAT)
    hit = findings_for(check_model(b.model(["input"], [out])), "unpaired-quantize")
    assert [f.node for f in hit] == ["lonely"]


def test_float_model_is_reported_once_not_per_node():
    b = GraphBuilder()
    w = b.const(np.random.default_rng(0).standard_normal((C, C, 3, 3)).astype(np.float32))
    out = b.node("Conv", ["input", w], pads=[1, 1, 1, 1])
    report = check_model(b.model(["input"], [out]))
    assert report.rules_hit() == ["no-qdq"] and report.ok


def test_invalid_model_is_an_error():
    model = good_conv_model()
    model.graph.node[2].input[0] = "does_not_exist"
    assert "invalid-model" in rules(model)


def test_cli_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(good_conv_model(), good)
    b = GraphBuilder()
    out = b.node("Conv", [b.qdq("input", zero_point=np.int8(5), name="asym"), b.weight_dq()], pads=[1, 1, 1, 1])
    onnx.save(b.model(["input"], [out]), bad)
    assert main(["check", str(good)]) == 0
    assert main(["check", str(bad)]) == 1
    printed = capsys.readouterr().out
    assert "asymmetric-zero-point" in printed and "asym_q" in printed


def test_cli_strict_fails_on_warnings(tmp_path):
    b = GraphBuilder()
    y = b.node("Relu", [b.conv("input")])
    path = tmp_path / "warn.onnx"
    onnx.save(b.model(["input"], [b.conv(y, quantize_input=False)]), path)
    assert main(["check", str(path)]) == 0
    assert main(["check", str(path), "--strict"]) == 1


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model at all\n" * 20])
def test_cli_rejects_non_onnx(tmp_path, capsys, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "model.onnx" in err and ("not an ONNX model" in err or "empty file" in err)


def test_cli_rejects_truncated_onnx(tmp_path, capsys):
    full = good_conv_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(full[: len(full) // 2])
    assert main(["check", str(path)]) == 1
    assert "truncated.onnx" in capsys.readouterr().err
