"""The ONNX Runtime backend: FP32, FP16 and INT8 ONNX models on the CPU (or any provider).

ONNX Runtime executes a Q/DQ model with real integer kernels when its graph
optimizer fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` (and the like). Whether
that happened is visible in the optimized model it can save;
:func:`quantized_kernels` reports it per operator type.

Before it runs a model, the runner checks that the model's integer kernels are
exact on this CPU (:func:`quantlab.runtimes.onnxruntime.verify.verify_model`): ONNX Runtime's
u8 x s8 kernels saturate on x86 CPUs without VNNI, and a wrong number must not
reach the user as an accuracy. A TensorRT-form file (``quantlab.target`` =
``tensorrt``) is run with ONNX Runtime's QDQ fusions off, so its Q/DQ rounding is
computed with float kernels as TensorRT's numerics prescribe, on every CPU (with
them on, ORT turns its INT8 activations into UINT8 and runs u8 x s8 kernels).
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


def _session_options(threads: Optional[int], optimized_model_path: Optional[Union[str, Path]], level: str,
                     qdq_fusion: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not qdq_fusion:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
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
        verify_int8: Refuse a model whose integer kernels are not exact on this CPU
            (default; off only to inspect a graph without computing with it).
        qdq_fusion: Let ONNX Runtime fuse Q/DQ patterns into integer kernels
            (default: yes, except for TensorRT-form files, which run in float).

    Attributes:
        int8_form: What the check found (recorded form, integer kernels), or None.

    Raises:
        FileNotFoundError / OnnxFormatError: the file is missing or not ONNX.
        OrtFormError: the model's integer kernels are not exact on this CPU.
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
        verify_int8: bool = True,
        qdq_fusion: Optional[bool] = None,
    ) -> None:
        import onnxruntime as ort

        from quantlab.export.graph import load_onnx
        from quantlab.runtimes.onnxruntime.verify import verify_model

        self.path = Path(path)
        model = load_onnx(self.path, check=False)  # clear errors for missing / non-ONNX / truncated files
        if qdq_fusion is None:
            target = next((p.value for p in model.metadata_props if p.key == "quantlab.target"), None)
            qdq_fusion = target != "tensorrt"
        self.qdq_fusion = qdq_fusion
        self.int8_form = verify_model(model, str(self.path), qdq_fusion=qdq_fusion) if verify_int8 else None
        del model
        options = _session_options(threads, optimized_model_path, optimization, qdq_fusion)
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
        # Only the graph is read here, nothing is computed: no exactness check needed.
        OnnxRuntimeRunner(path, threads=threads, optimized_model_path=optimized, verify_int8=False).close()
        model = onnx.load(str(optimized))
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def quantized_kernels(path: Union[str, Path], *, threads: Optional[int] = 1) -> Dict[str, int]:
    """Integer-kernel operators ONNX Runtime runs for ``path`` (empty if all float)."""
    return {op: n for op, n in optimized_op_counts(path, threads=threads).items() if op in INTEGER_OPS}


__all__ = ["INTEGER_OPS", "OnnxRuntimeRunner", "optimized_op_counts", "quantized_kernels"]
