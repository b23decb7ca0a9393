"""Deployment artifacts: Q/DQ INT8 ONNX, FP16/FP32 ONNX, placement checks, calibration caches.

    from quantlab.export import export_int8, export_float, check_model, write_calibration_cache
    result = export_int8(qmodel, "model.int8.onnx", example_batch)          # TensorRT Q/DQ form
    export_int8(qmodel, "model.ort.onnx", example_batch, target="ort-cpu")   # ONNX Runtime CPU form
    fp32 = export_float(model, "model.fp32.onnx", example_batch)             # records tensor names
    report = check_model("model.int8.onnx")                                  # TensorRT placement rules

Heavy dependencies (onnx, torch exporters) load on first use of a function.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_int8": "quantlab.export.qdq",
    "check_exportable": "quantlab.export.qdq",
    "TARGETS": "quantlab.export.qdq",
    "export_float": "quantlab.export.float",
    "convert_to_fp16": "quantlab.export.float",
    "check_model": "quantlab.export.check",
    "CheckReport": "quantlab.export.check",
    "Finding": "quantlab.export.check",
    "apply_placement": "quantlab.export.placement",
    "PlacementReport": "quantlab.export.placement",
    "convert_to_ort_cpu": "quantlab.export.ort_cpu",
    "cached_probe": "quantlab.runtimes.onnxruntime.forms",
    "choose_form": "quantlab.runtimes.onnxruntime.forms",
    "resolve_form": "quantlab.runtimes.onnxruntime.forms",
    "verify_model": "quantlab.runtimes.onnxruntime.verify",
    "CalibrationCache": "quantlab.export.cache",
    "read_calibration_cache": "quantlab.export.cache",
    "write_calibration_cache": "quantlab.export.cache",
    "cache_from_scales": "quantlab.export.cache",
    "trt_version_number": "quantlab.export.cache",
    "ExportResult": "quantlab.export.result",
    "load_onnx": "quantlab.export.graph",
    "read_tensor_map": "quantlab.export.mapping",
    "qdq_table": "quantlab.export.qdq_table",
    "QdqRow": "quantlab.export.qdq_table",
    "ExportError": "quantlab.export.errors",
    "OnnxFormatError": "quantlab.export.errors",
    "CacheFormatError": "quantlab.export.errors",
    "TensorMappingError": "quantlab.export.errors",
    "OrtFormError": "quantlab.export.errors",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantlab.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
