"""The Q/DQ table of a real export: every Q/DQ node listed, with the scales of the scales file."""
import json

import numpy as np
import onnx
import pytest

from quantlab.cli.main import main
from quantlab.export.qdq_table import HEADERS, qdq_table
from quantlab.scales import Scales
from quantlab.roles import Role


def _batchnorm_factors(model):
    """``{conv module: |gamma / sqrt(var + eps)|}`` for each conv a BatchNorm follows (the export folds it)."""
    import torch

    factors, previous = {}, None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d) and previous is not None:
            factors[previous] = (module.weight / torch.sqrt(module.running_var + module.eps)).abs().detach().double().numpy()
        previous = name if isinstance(module, torch.nn.Conv2d) else None
    return factors


def test_every_qdq_node_is_listed_with_the_scales_file_scales(exports, calibrated, fp32_model, tmp_path):
    _, scales = calibrated
    folded = _batchnorm_factors(fp32_model)
    saved = Scales.load(scales.save(tmp_path / "scales.percentile.json"))
    export = exports["int8"]
    model = onnx.load(str(export.path))
    qdq_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    rows = qdq_table(export.path)
    assert len(rows) == len(qdq_nodes) > 0
    assert [r.node for r in rows] == [n.name for n in qdq_nodes]

    checked = {"input": 0, "weight": 0}
    by_tensor = {}
    for row in rows:
        by_tensor.setdefault(row.tensor, []).append(row)
    for entry in saved.entries:
        tensor = export.tensor_map.get(entry.key)
        if tensor is None:
            continue
        expected = np.atleast_1d(np.asarray(entry.scale, dtype=np.float32))
        if entry.role is Role.INPUT:
            # The activation's Q reads the tensor; its scale is the scales file's amax / 127.
            (q,) = [r for r in by_tensor[tensor] if r.op == "Q"]
            assert q.quantized == "activation" and q.layer == entry.key
            np.testing.assert_allclose(q.scales, expected, rtol=1e-6)
            assert set(q.zero_points) == {0} and q.dtype == "int8"
            # The DQ after it carries the same scale and names the same layer.
            dq = [r for r in rows if r.op == "DQ" and r.layer == entry.key and r.quantized == "activation"]
            assert dq and all(np.allclose(d.scales, expected, rtol=1e-6) for d in dq)
            checked["input"] += 1
        else:
            (dq,) = by_tensor[tensor]
            assert dq.op == "DQ" and dq.quantized == "weight" and dq.layer == entry.key
            # A conv's following BatchNorm is folded into it: the per-channel scale becomes s * |gamma / sigma|.
            np.testing.assert_allclose(dq.scales, expected * folded.get(entry.module, 1.0), rtol=1e-5)
            assert dq.per_channel == (expected.size > 1) and (dq.axis == 0 if dq.per_channel else dq.axis is None)
            assert any(c.startswith(("Conv ", "Gemm ", "MatMul ")) for c in dq.consumers)
            checked["weight"] += 1
    assert checked["input"] >= 3 and checked["weight"] >= 3 and len(folded) >= 3


def test_float_export_has_an_empty_table(exports):
    assert qdq_table(exports["fp32"].path) == []


def test_cli_check_table_prints_one_line_per_node(exports, capsys):
    path = str(exports["int8"].path)
    assert main(["check", path, "--table"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| node"))
    assert all(h in header for h in HEADERS)
    rows = qdq_table(path)
    for row in rows:
        assert any(row.tensor in line and f"| {row.op} " in line for line in lines)
    assert main(["check", path, "--table", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["node"] for r in data["qdq"]] == [r.node for r in rows]
    assert data["qdq"][0]["scale"] == rows[0].scale_text()


def test_non_constant_scale_is_an_error_not_a_traceback():
    from onnx import TensorProto, helper

    from quantlab.export.errors import OnnxFormatError

    node = helper.make_node("QuantizeLinear", ["x", "s"], ["y"], name="q")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [1])])
    with pytest.raises(OnnxFormatError, match="q: the scale is not a constant"):
        qdq_table(helper.make_model(graph))


def test_cli_export_names_the_calibrator_in_the_file_and_the_table(calibrated, tmp_path, capsys):
    _, scales = calibrated
    scales_file = scales.save(tmp_path / "scales.percentile.json")
    out = tmp_path / "model.int8.onnx"
    assert main(["export", "--model", "quantlab.models.fmnist:pretrained_fmnist_cnn", "--scales", str(scales_file),
                 "--input-shape", "1,28,28", "--out", str(out)]) == 0
    assert "from: INT8 · calibrator percentile · algorithms: none" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["quantlab.calibrator"] == "percentile" and json.loads(meta["quantlab.algorithms"]) == []
    assert main(["check", str(out), "--table"]) == 0
    assert "made from: INT8 · calibrator percentile" in capsys.readouterr().out
