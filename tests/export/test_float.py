"""FP32 and FP16 ONNX export of the demo CNN."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from quantlab.export.check import check_model
from quantlab.export.errors import ExportError
from quantlab.export.float import export_float
from tests.export.helpers import ort_logits, torch_logits


def test_fp32_onnx_matches_pytorch(exports, fp32_model, test_set):
    images, _ = test_set
    np.testing.assert_allclose(ort_logits(exports["fp32"].path, images[:200]), torch_logits(fp32_model, images[:200]), atol=1e-4)
    model = onnx.load(str(exports["fp32"].path))
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]  # folded
    assert check_model(model).rules_hit() == ["no-qdq"]


def test_fp32_records_the_input_tensor_of_every_layer(exports):
    result = exports["fp32"]
    model = onnx.load(str(result.path))
    conv_inputs = [n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert sorted(result.tensor_map.values()) == sorted(conv_inputs) and len(conv_inputs) == 8
    assert result.tensor_map["stem.0:input"] == "input"


def test_fp16_weights_and_activations_are_fp16(exports):
    model = onnx.load(str(exports["fp16"].path))
    floats = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    # inputs/outputs stay FP32 by default (a Cast at each boundary)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    conv_out = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert types[conv_out] == TensorProto.FLOAT16


def test_fp16_agrees_with_fp32(exports, test_set):
    images, labels = test_set
    fp32 = ort_logits(exports["fp32"].path, images)
    fp16 = ort_logits(exports["fp16"].path, images)
    agreement = 100.0 * np.mean(fp32.argmax(1) == fp16.argmax(1))
    assert agreement >= 99.5, agreement
    assert np.abs(fp32 - fp16).max() < 0.1  # FP16 rounding of weights and activations


def test_fp16_with_fp16_io(fp32_model, test_set, tmp_path):
    images, _ = test_set
    result = export_float(fp32_model, tmp_path / "io16.onnx", images[:2], precision="fp16", io_dtype="fp16")
    model = onnx.load(str(result.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    out = ort_logits(result.path, images[:100].half(), batch=100)
    assert out.dtype == np.float16
    assert np.mean(out.argmax(1) == torch_logits(fp32_model, images[:100]).argmax(1)) >= 0.99


def test_quantized_model_exports_in_float(calibrated, exports, test_set, tmp_path):
    model, _ = calibrated
    result = export_float(model, tmp_path / "q_as_fp32.onnx", test_set[0][:2])
    onnx_model = onnx.load(str(result.path))
    assert not [n for n in onnx_model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    images = test_set[0][:100]
    np.testing.assert_allclose(ort_logits(result.path, images), ort_logits(exports["fp32"].path, images), atol=1e-4)
    assert result.tensor_map == exports["fp32"].tensor_map  # same tensor names: the cache fits both


def test_bad_precision(fp32_model, tmp_path):
    with pytest.raises(ExportError, match="unknown float precision 'int4'"):
        export_float(fp32_model, tmp_path / "m.onnx", torch.zeros(2, 1, 28, 28), precision="int4")
    assert not (tmp_path / "m.onnx").exists()
