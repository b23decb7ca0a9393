"""INT8 ONNX export of a calibrated model with explicit QuantizeLinear/DequantizeLinear.

The graph TensorRT's strongly typed builder expects (``--target tensorrt``):

* symmetric INT8, zero point 0 (int8), scale = amax / 127 (float32 constants);
* weights as ``DequantizeLinear(int8 initializer)`` with per-channel scales on
  the output-channel axis (0 for Conv/Linear, 1 for ConvTranspose and HF Conv1D);
  the integer values are exactly PyTorch's fake-quantized ones (narrow range);
* activations per tensor, Q/DQ in front of every quantized layer's input;
* inference BatchNormalization folded into the conv (exact on the INT8 grid);
* the placement pass of :mod:`quantlab.export.placement` (residual Add, Concat, Pad);
* a symbolic batch dimension by default.

``--target ort-cpu`` rewrites the same graph for ONNX Runtime's x86 INT8 kernels
(:mod:`quantlab.export.ort_cpu`), with the same scales and the same numerics.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import onnx
from torch import nn

import quantlab
from quantlab.attach import float_layers, get_config, iter_quantizers
from quantlab.export.errors import ExportError
from quantlab.export.fold import fold_batchnorm, fold_constants, fold_weight_quantizers
from quantlab.export.graph import GraphView, default_opset, save_onnx
from quantlab.export.mapping import METADATA_KEY, build_tensor_map, set_metadata
from quantlab.export.placement import apply_placement
from quantlab.export.result import ExportResult, write_sidecar
from quantlab.export.torch_export import DEFAULT_EXPORTER, DEFAULT_OPSET, export_in_eval
from quantlab.tensor_quantizer import QuantizerMode, Role

TARGETS = ("tensorrt", "ort-cpu")


def check_exportable(model: nn.Module) -> List[str]:
    """Validates the model's quantizers for INT8 export; returns the quantized module names.

    Raises:
        ExportError: no quantizers, a layer without an activation scale, or a
            quantizer ONNX Q/DQ cannot express (not 8-bit, narrow activations).
    """
    refs = list(iter_quantizers(model))
    if not refs:
        raise ExportError(
            f"{type(model).__name__} has no quantizers: quantize and calibrate it (quantlab.quantize + calibrate) "
            "or load scales (quantlab.load_scales) before an INT8 export"
        )
    # A layer whose quantizers are all off beside calibrated ones was kept in float (mixed
    # precision, e.g. loaded from autoprecision's scales): it exports as float and needs no scale.
    # If nothing is calibrated, the model simply was never calibrated.
    any_active = any(r.role is Role.INPUT and r.quantizer.mode is QuantizerMode.QUANTIZE and r.quantizer.is_calibrated for r in refs)
    kept_float = set(float_layers(model)) if any_active else set()
    uncalibrated = [r.module_name for r in refs
                    if r.role is Role.INPUT and r.module_name not in kept_float and not r.quantizer.is_calibrated]
    if uncalibrated:
        shown = ", ".join(uncalibrated[:10]) + (" ..." if len(uncalibrated) > 10 else "")
        raise ExportError(
            f"{len(uncalibrated)} quantized layer(s) have no activation scale: {shown}; "
            "calibrate the model or load a scales file that covers them (or exclude those layers)"
        )
    problems = []
    for ref in refs:
        spec = ref.quantizer.spec
        if ref.quantizer.mode is not QuantizerMode.QUANTIZE:
            continue
        if spec.num_bits != 8:
            problems.append(f"'{ref.key}' uses {spec.num_bits} bits (ONNX INT8 Q/DQ needs 8)")
        if ref.role is Role.INPUT and spec.narrow_range:
            problems.append(f"'{ref.key}' uses the narrow range [-127, 127] for an activation (TensorRT activations use [-128, 127])")
        if ref.role is Role.INPUT and spec.axis is not None:
            problems.append(f"'{ref.key}' is per-channel (TensorRT quantizes activations per tensor)")
        if ref.role == "input" and ref.quantizer.is_calibrated and not bool((ref.quantizer.amax > 0).all()):
            problems.append(f"'{ref.key}' has range 0 (its calibration saw only zeros): every value would quantize to 0; "
                            "keep the layer in floating point (quantlab.calibrate does) or recalibrate with data that reaches it")
    if problems:
        raise ExportError("cannot export these quantizers as ONNX Q/DQ: " + "; ".join(problems))
    return sorted({r.module_name for r in refs})


def export_int8(
    model: nn.Module,
    path: Union[str, Path],
    example_inputs: Any,
    *,
    target: str = "tensorrt",
    exporter: str = DEFAULT_EXPORTER,
    opset: int = DEFAULT_OPSET,
    input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None,
    dynamic_batch: bool = True,
    placement: bool = True,
    fold_bn: bool = True,
    ort_other_convs: str = "im2col",
    ort_int8: str = "auto",
    ort_reduce_range: bool = False,
    sidecar: bool = True,
    metadata: Optional[Dict[str, str]] = None,
) -> ExportResult:
    """Exports a calibrated quantized model as a Q/DQ ONNX file.

    Args:
        model: Quantized with ranges (``quantlab.quantize`` + ``calibrate`` or
            ``load_scales``). It is not modified.
        path: Output ``.onnx`` file (written atomically).
        example_inputs: A batch (tensor, tuple or dict) of the model's inputs.
        target: ``"tensorrt"`` (INT8 zero point 0 everywhere) or ``"ort-cpu"``
            (activations UINT8 zero point 128 and ONNX Runtime integer kernels).
        exporter: ``"torchscript"`` (default, fast) or ``"dynamo"``.
        opset: Default-domain opset (>= 13; dynamo uses at least 18).
        input_names / output_names: Graph I/O names.
        dynamic_batch: Symbolic batch dimension.
        placement: Run the TensorRT placement pass.
        fold_bn: Fold BatchNormalization into the preceding conv.
        ort_other_convs: ort-cpu only: how convs that cannot become QLinearConv
            run: ``"im2col"`` (default), ``"float"`` or ``"conv-integer"``
            (see :mod:`quantlab.export.ort_cpu`).
        ort_int8: ort-cpu only: the integer form, ``"auto"`` (default: u8s8 where
            this CPU computes it exactly, else u8u8, else qdq-float; see
            :mod:`quantlab.runtimes.onnxruntime.forms`) or one of ``"u8s8"``, ``"u8u8"``,
            ``"qdq-float"`` (forced, e.g. for another machine). Recorded in the
            file's metadata (``quantlab.ort_int8``).
        ort_reduce_range: ort-cpu only: 7-bit weights (exact u8s8 on any CPU, but
            NOT the values TensorRT computes with); recorded in the metadata.
        sidecar: Also write ``<path>.json`` with the quantizer -> tensor map.
        metadata: More ``metadata_props`` entries (keys ``quantlab.*``): where the scales came
            from (``quantlab.calibrator``, ``quantlab.algorithms``, ``quantlab.algorithm_reports``, ...).
            Without it the algorithms the model's config names are recorded.

    Raises:
        ExportError: the model is not exportable (see :func:`check_exportable`),
            the exporter failed, or the result fails the ONNX checker.
    """
    if target not in TARGETS:
        raise ExportError(f"unknown INT8 target {target!r}; choose one of {', '.join(TARGETS)}")
    from quantlab.export.ort_cpu import OTHER_CONVS

    if ort_other_convs not in OTHER_CONVS:
        raise ExportError(f"ort_other_convs must be one of {', '.join(OTHER_CONVS)}, got {ort_other_convs!r}")
    if opset < 13:
        raise ExportError(f"opset {opset} is too low for per-channel Q/DQ: use 13 or newer")
    from quantlab.outputs import ONNX_FILE, check_output_file

    check_output_file(path, label="output", replace=ONNX_FILE)  # a folder or a non-ONNX file: refused before exporting
    start = time.perf_counter()
    choice = None
    if target == "ort-cpu":
        from quantlab.runtimes.onnxruntime.forms import resolve_form

        choice = resolve_form(ort_int8, reduce_range=ort_reduce_range)  # before the work: may probe this CPU
    elif ort_int8 != "auto" or ort_reduce_range:
        raise ExportError("ort_int8 / ort_reduce_range apply to target='ort-cpu' only; the TensorRT form is always INT8 Q/DQ")
    modules = check_exportable(model)
    proto = export_in_eval(
        model, example_inputs, exporter=exporter, opset=opset, input_names=input_names,
        output_names=output_names, dynamic_batch=dynamic_batch,
    )
    view = GraphView(proto)
    fold_constants(view)
    fold_weight_quantizers(view)
    folded = fold_batchnorm(view) if fold_bn else []
    tensor_map = build_tensor_map(view, modules, quantized=True)
    active = {r.key for r in iter_quantizers(model) if r.quantizer.mode is QuantizerMode.QUANTIZE}
    unmapped = sorted(k for k in active if k not in tensor_map)
    clean_qdq_names(view, tensor_map)
    report = apply_placement(view) if placement else None
    rewrites = None
    if target == "ort-cpu":
        from quantlab.export.ort_cpu import convert_to_ort_cpu

        rewrites = convert_to_ort_cpu(view, other_convs=ort_other_convs, form=choice.form, weight_bits=choice.weight_bits)
    proto = view.commit()
    entries = {
        "quantlab.format": "qdq-int8",
        "quantlab.target": target,
        "quantlab.exporter": exporter,
        "quantlab.version": quantlab.__version__,
        METADATA_KEY: json.dumps(tensor_map, sort_keys=True),
    }
    config = get_config(model)
    if config is not None and config.algorithms:
        entries["quantlab.algorithms"] = json.dumps(list(config.algorithms))
    if choice is not None:
        from quantlab.runtimes.onnxruntime.verify import form_metadata

        entries.update(form_metadata(choice))
    entries.update(metadata or {})
    set_metadata(proto, entries)
    proto.producer_name = "quantlab"
    _check_graph(proto, "INT8 export")
    out = save_onnx(proto, path)
    result = ExportResult(
        path=out, precision="int8", target=target, exporter=exporter, opset=default_opset(proto),
        input_names=[i.name for i in proto.graph.input], output_names=[o.name for o in proto.graph.output],
        tensor_map=tensor_map, unmapped=unmapped, folded_batchnorm=folded,
        placement=report.to_dict() if report else None, ort_cpu=rewrites,
        ort_int8=choice.to_dict() if choice is not None else None, seconds=time.perf_counter() - start,
    )
    if sidecar:
        write_sidecar(result)
    return result


def clean_qdq_names(view: GraphView, tensor_map: Dict[str, str]) -> None:
    """Names Q/DQ nodes, their outputs and scales after the module they quantize.

    The exporters name an input quantizer after the scope its hook ran in
    (``/block1/input_quantizer_1``), which says nothing about the layer;
    ``block1.conv2.input_quantizer/QuantizeLinear`` does. The float tensors the
    calibration cache refers to keep their names.
    """
    renames: Dict[str, str] = {}
    for key, tensor in tensor_map.items():
        module, role = key.rsplit(":", 1)
        if Role(role) is not Role.INPUT:
            continue
        for q in view.uses(tensor):
            if q.op_type != "QuantizeLinear":
                continue
            prefix = f"{module}.input_quantizer"
            q.name = view.unique(f"{prefix}/QuantizeLinear")
            renames[q.output[0]] = view.unique(f"{prefix}/quantized")
            _rename_const(view, q, 1, f"{module}.input_scale", renames)
            _rename_const(view, q, 2, f"{module}.input_zero_point", renames)
            for dq in view.uses(q.output[0]):
                if dq.op_type == "DequantizeLinear":
                    dq.name = view.unique(f"{prefix}/DequantizeLinear")
                    renames[dq.output[0]] = view.unique(f"{prefix}/dequantized")
            break
    for key, weight in tensor_map.items():
        module, role = key.rsplit(":", 1)
        if Role(role) is not Role.WEIGHT:
            continue
        for dq in view.uses(weight):
            if dq.op_type == "DequantizeLinear":
                dq.name = view.unique(f"{module}.weight_quantizer/DequantizeLinear")
                renames[dq.output[0]] = view.unique(f"{module}.weight_quantizer/dequantized")
    _apply_renames(view, renames)


def _rename_const(view: GraphView, node: onnx.NodeProto, index: int, name: str, renames: Dict[str, str]) -> None:
    if len(node.input) <= index or not node.input[index] or node.input[index] not in view.initializers:
        return
    old = node.input[index]
    if old in renames or len(view.uses(old)) > 2:  # shared with other Q/DQ pairs: keep one name
        return
    renames[old] = view.unique(name)


def _apply_renames(view: GraphView, renames: Dict[str, str]) -> None:
    for node in view.nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames and name not in view.graph_outputs:
                node.output[i] = renames[name]
    for old, new in renames.items():
        if old in view.initializers:
            tensor = view.initializers.pop(old)
            tensor.name = new
            view.initializers[new] = tensor
            if old in view._arrays:
                view._arrays[new] = view._arrays.pop(old)
    view.refresh()


def _check_graph(proto: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - a bug in a pass must not produce a file
        raise ExportError(f"{what} produced an invalid ONNX graph: {str(exc).strip().splitlines()[0][:300]}") from exc


def tensor_map_of(result_or_path: Union[ExportResult, str, Path]) -> Dict[str, str]:
    """The quantizer -> tensor map of an export result or an exported file."""
    if isinstance(result_or_path, ExportResult):
        return dict(result_or_path.tensor_map)
    from quantlab.export.graph import load_onnx
    from quantlab.export.mapping import read_tensor_map

    return read_tensor_map(load_onnx(result_or_path, check=False))


__all__ = ["TARGETS", "check_exportable", "export_int8", "tensor_map_of"]
