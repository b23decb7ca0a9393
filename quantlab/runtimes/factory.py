"""Picks the runner for a model file: ``.onnx`` -> ONNX Runtime, ``.plan``/``.engine`` -> TensorRT."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from quantlab.runtimes.base import Runner, RunnerError

PLAN_SUFFIXES = (".plan", ".engine", ".trt")


def open_runner(path: Union[str, Path], *, backend: Optional[str] = None, threads: Optional[int] = None) -> Runner:
    """A runner for ``path``; ``backend`` ("onnxruntime" | "tensorrt") overrides the suffix."""
    path = Path(path)
    backend = backend or ("tensorrt" if path.suffix.lower() in PLAN_SUFFIXES else "onnxruntime")
    if backend == "onnxruntime":
        from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, threads=threads)
    if backend == "tensorrt":
        from quantlab.runtimes.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(path)
    raise RunnerError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")


__all__ = ["PLAN_SUFFIXES", "open_runner"]
