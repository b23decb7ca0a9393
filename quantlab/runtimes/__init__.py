"""Runners with one interface for PyTorch, ONNX Runtime and TensorRT.

    from quantlab.runtimes import OnnxRuntimeRunner, TorchRunner
    with OnnxRuntimeRunner("model.int8.onnx", threads=2) as runner:
        result = runner.run_dataset(loader)          # top-1, outputs
        latency = runner.measure_latency(batch)      # median ms
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Runner": "quantlab.runtimes.base",
    "RunnerError": "quantlab.runtimes.base",
    "LatencyStats": "quantlab.runtimes.base",
    "DatasetResult": "quantlab.runtimes.base",
    "TorchRunner": "quantlab.runtimes.pytorch.runner",
    "OnnxRuntimeRunner": "quantlab.runtimes.onnxruntime.runner",
    "quantized_kernels": "quantlab.runtimes.onnxruntime.runner",
    "optimized_op_counts": "quantlab.runtimes.onnxruntime.runner",
    "TensorRTRunner": "quantlab.runtimes.tensorrt.runner",
    "open_runner": "quantlab.runtimes.factory",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantlab.runtimes' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
