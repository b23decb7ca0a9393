"""The ONNX Runtime backend: FP32, FP16 and INT8 ONNX models on the CPU (or any provider).

ONNX Runtime executes a Q/DQ model with real integer kernels when its graph
optimizer fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` (and the like). Whether
that happened is visible in the optimized model it can save;
:func:`quantized_kernels` reports it per operator type.
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from quantlab.runtimes.base import Inputs, Runner, RunnerError

#: Operators that compute on integers (quantized kernels), standard and com.microsoft.
INTEGER_OPS = (
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "DynamicQuantizeMatMul", "QAttention",
)

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _session_options(threads: Optional[int], optimized_model_path: Optional[Union[str, Path]], level: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    options.log_severity_level = 3  # the hardware-specific-optimizations notice is expected
    return options


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file with ONNX Runtime.

    Args:
        path: The ``.onnx`` model.
        threads: Intra-op threads (default: ONNX Runtime's choice).
        providers: Execution providers (default CPU).
        optimization: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
        optimized_model_path: Save the graph ONNX Runtime actually runs there.

    Raises:
        FileNotFoundError / OnnxFormatError: the file is missing or not ONNX.
        RunnerError: ONNX Runtime refuses the model (message names the file).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: Union[str, Path],
        *,
        threads: Optional[int] = None,
        providers: Optional[Sequence[str]] = None,
        optimization: str = "all",
        optimized_model_path: Optional[Union[str, Path]] = None,
    ) -> None:
        import onnxruntime as ort

        from quantlab.export.graph import load_onnx

        self.path = Path(path)
        load_onnx(self.path, check=False)  # clear errors for missing / non-ONNX / truncated files
        options = _session_options(threads, optimized_model_path, optimization)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise RunnerError(f"{self.path}: ONNX Runtime cannot load the model: {str(exc).strip()[:400]}") from exc
        self._inputs = self.session.get_inputs()
        self._outputs = self.session.get_outputs()

    @property
    def input_names(self) -> List[str]:
        return [i.name for i in self._inputs]

    @property
    def output_names(self) -> List[str]:
        return [o.name for o in self._outputs]

    def input_dtypes(self) -> Dict[str, type]:
        return {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self._inputs}

    def input_shapes(self) -> Dict[str, list]:
        return {i.name: list(i.shape) for i in self._inputs}

    def run(self, inputs: Inputs) -> List[np.ndarray]:
        feeds = self.feeds(inputs)
        dtypes = self.input_dtypes()
        feeds = {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) for k, v in feeds.items()}
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            shapes = {k: tuple(v.shape) for k, v in feeds.items()}
            raise RunnerError(f"{self.path}: ONNX Runtime failed on inputs {shapes}: {str(exc).strip()[:400]}") from exc


def optimized_op_counts(path: Union[str, Path], *, threads: Optional[int] = 1) -> Dict[str, int]:
    """Operator types (with counts) of the graph ONNX Runtime runs after its optimizations."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="quantlab_ort_") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        OnnxRuntimeRunner(path, threads=threads, optimized_model_path=optimized).close()
        model = onnx.load(str(optimized))
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def quantized_kernels(path: Union[str, Path], *, threads: Optional[int] = 1) -> Dict[str, int]:
    """Integer-kernel operators ONNX Runtime runs for ``path`` (empty if all float)."""
    return {op: n for op, n in optimized_op_counts(path, threads=threads).items() if op in INTEGER_OPS}


__all__ = ["INTEGER_OPS", "OnnxRuntimeRunner", "optimized_op_counts", "quantized_kernels"]
