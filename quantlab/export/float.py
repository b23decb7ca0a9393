"""FP32 and FP16 ONNX export of the same model.

TensorRT 11's builder is always strongly typed: an engine's precision comes from
the graph. An FP32 graph builds an FP32 (or TF32) engine; for FP16 the weights
and activations must be FP16 in the ONNX file itself. :func:`export_float`
exports the model as FP32 (BatchNorm folded) and, for FP16, converts every
float initializer and tensor to FP16, with inputs/outputs left FP32 (a Cast at
the boundary) or FP16, as the caller chooses.

The FP32 export also records which tensor feeds each quantizable layer
(``quantlab.tensor_map`` metadata and the sidecar JSON): the legacy calibration
cache is keyed by those names.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import quantlab
from quantlab.attach import is_quantized, iter_quantizers
from quantlab.export.errors import ExportError
from quantlab.export.fold import fold_batchnorm, fold_constants
from quantlab.export.graph import GraphView, default_opset, save_onnx
from quantlab.export.mapping import METADATA_KEY, build_tensor_map, set_metadata
from quantlab.export.result import ExportResult, write_sidecar
from quantlab.export.torch_export import DEFAULT_EXPORTER, DEFAULT_OPSET, export_in_eval
from quantlab.registry import lookup_quantizable

PRECISIONS = ("fp32", "fp16")
FP16_MAX = float(np.finfo(np.float16).max)

# (op_type, input index) that ONNX requires to stay float32/int whatever the data type.
_KEEP_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
# Ops whose float attributes / outputs are typed by an attribute, not by their inputs.
_TYPED_BY_ATTRIBUTE = {"Cast", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"}


def _quantizable_modules(model: nn.Module) -> List[str]:
    if is_quantized(model):
        return sorted({r.module_name for r in iter_quantizers(model)})
    return [name for name, module in model.named_modules() if name and lookup_quantizable(module) is not None]


def export_float(
    model: nn.Module,
    path: Union[str, Path],
    example_inputs: Any,
    *,
    precision: str = "fp32",
    io_dtype: Optional[str] = None,
    exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_batch: bool = True,
    sidecar: bool = True,
    metadata: Optional[Dict[str, str]] = None,
) -> ExportResult:
    """Exports ``model`` as an FP32 or FP16 ONNX file (quantizers, if any, switched off).

    Args:
        model: Any model; a quantized one is exported in floating point.
        path: Output ``.onnx`` file (written atomically).
        example_inputs: A batch of the model's inputs.
        precision: ``"fp32"`` or ``"fp16"``.
        io_dtype: Data type of graph inputs/outputs for FP16: ``"fp32"`` (default:
            Casts at the boundary, a drop-in replacement) or ``"fp16"``.
        exporter / opset / input_names / output_names / dynamic_batch: as in
            :func:`quantlab.export.qdq.export_int8`.
        sidecar: Also write ``<path>.json`` with the layer -> tensor map.
        metadata: Extra string entries for the file's metadata (its provenance).

    Raises:
        ExportError: unknown precision, exporter failure, or an invalid result.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown float precision {precision!r}; choose one of {', '.join(PRECISIONS)} (int8: export_int8)")
    io_dtype = io_dtype or "fp32"
    if io_dtype not in PRECISIONS:
        raise ExportError(f"io_dtype must be fp32 or fp16, got {io_dtype!r}")
    from quantlab.outputs import ONNX_FILE, check_output_file

    check_output_file(path, label="output", replace=ONNX_FILE)  # a folder or a non-ONNX file: refused before exporting
    start = time.perf_counter()
    modules = _quantizable_modules(model)
    proto = export_in_eval(
        model, example_inputs, exporter=exporter, opset=opset, input_names=input_names,
        output_names=output_names, dynamic_batch=dynamic_batch, float_only=True,
    )
    view = GraphView(proto)
    fold_constants(view)
    folded = fold_batchnorm(view)
    tensor_map = {k: v for k, v in build_tensor_map(view, modules, quantized=False).items() if k.endswith(":input")}
    proto = view.commit()
    if precision == "fp16":
        proto = convert_to_fp16(proto, keep_io_fp32=io_dtype == "fp32")
    set_metadata(proto, {
        "quantlab.format": precision,
        "quantlab.exporter": exporter,
        "quantlab.version": quantlab.__version__,
        METADATA_KEY: json.dumps(tensor_map, sort_keys=True),
        **(metadata or {}),  # the caller's provenance (``quantlab.source_run`` ...)
    })
    proto.producer_name = "quantlab"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{precision.upper()} export produced an invalid ONNX graph: {str(exc).strip().splitlines()[0][:300]}") from exc
    out = save_onnx(proto, path)
    result = ExportResult(
        path=out, precision=precision, target=None, exporter=exporter, opset=default_opset(proto),
        input_names=[i.name for i in proto.graph.input], output_names=[o.name for o in proto.graph.output],
        tensor_map=tensor_map, unmapped=sorted(f"{m}:input" for m in modules if f"{m}:input" not in tensor_map),
        folded_batchnorm=folded, seconds=time.perf_counter() - start,
    )
    if sidecar:
        write_sidecar(result)
    return result


def convert_to_fp16(model: onnx.ModelProto, *, keep_io_fp32: bool = True) -> onnx.ModelProto:
    """Converts an FP32 graph to FP16: initializers, Constants, Cast targets, I/O.

    Values beyond FP16's range are clamped to +-65504 (a warning says how many).

    Args:
        model: An FP32 model (not modified).
        keep_io_fp32: Keep float inputs/outputs FP32 and insert Casts at the boundary.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    view = GraphView(model)
    keep32 = {node.input[i] for node in view.nodes for (op, i) in _KEEP_FLOAT32_INPUTS if node.op_type == op and len(node.input) > i}
    clamped = 0
    for name, tensor in list(view.initializers.items()):
        if tensor.data_type == TensorProto.FLOAT and name not in keep32:
            array = numpy_helper.to_array(tensor)
            clamped += int(np.sum(np.abs(array) > FP16_MAX))
            view.set_initializer(name, np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16))
    for node in view.nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT and node.op_type in ("Constant", "ConstantOfShape"):
                array = numpy_helper.to_array(attr.t)
                attr.t.CopyFrom(numpy_helper.from_array(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), attr.t.name))
            if node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                raise ExportError(f"Constant node '{node.name}' uses {attr.name}; run constant normalization before FP16 conversion")
        if node.op_type in _TYPED_BY_ATTRIBUTE:
            for attr in node.attribute:
                if attr.name in ("to", "dtype") and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16
    boundary: List[onnx.NodeProto] = []
    for value in graph.input:
        if value.name in view.initializers or value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if keep_io_fp32:
            casted = view.unique(f"{value.name}.fp16")
            view.replace_uses(value.name, casted)
            boundary.append(helper.make_node("Cast", [value.name], [casted], to=TensorProto.FLOAT16, name=view.unique(f"{value.name}/CastToFp16")))
        else:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    view.nodes[0:0] = boundary
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if keep_io_fp32:
            inner = view.unique(f"{value.name}.fp16")
            for node in view.nodes:
                for i, name in enumerate(node.output):
                    if name == value.name:
                        node.output[i] = inner
            view.replace_uses(value.name, inner)
            view.nodes.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT, name=view.unique(f"{value.name}/CastToFp32")))
        else:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    view.refresh()
    view.commit()
    if clamped:
        warnings.warn(f"{clamped} weight value(s) exceed the FP16 range and were clamped to +-{FP16_MAX:g}", RuntimeWarning, stacklevel=2)
    return model


__all__ = ["PRECISIONS", "convert_to_fp16", "export_float"]
