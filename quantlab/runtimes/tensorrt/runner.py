"""The TensorRT backend of the runner interface (needs ``tensorrt`` and a CUDA GPU).

Written against TensorRT 10/11's name-based I/O API (``num_io_tensors``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) with torch
CUDA tensors as buffers. Not testable where TensorRT is absent: creating a
runner then raises :class:`~quantlab.runtimes.tensorrt.loader.TensorRTUnavailableError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import numpy as np

from quantlab.runtimes.tensorrt.loader import TensorRTUnavailableError, import_tensorrt
from quantlab.runtimes.base import Inputs, LatencyStats, Runner, RunnerError


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (plan file) on the current CUDA device.

    Raises:
        TensorRTUnavailableError: no ``tensorrt`` or no CUDA device.
        FileNotFoundError: no plan file.
        RunnerError: the plan cannot be deserialized (other TensorRT version or GPU).
    """

    backend = "tensorrt"

    def __init__(self, plan_path: Union[str, Path]) -> None:
        self.plan_path = Path(plan_path)
        if not self.plan_path.is_file():
            raise FileNotFoundError(f"{self.plan_path}: no such TensorRT plan file")
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailableError(f"{self.plan_path}: running a TensorRT engine needs a CUDA GPU; none is visible")
        self._trt, self._torch = trt, torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"{self.plan_path}: TensorRT cannot deserialize this plan (built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    @property
    def input_names(self) -> List[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> List[str]:
        return list(self._outputs)

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        table = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
            trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool,
        }
        for extra, dtype in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("UINT8", torch.uint8)):
            if hasattr(trt.DataType, extra):
                table[getattr(trt.DataType, extra)] = dtype
        return table[self.engine.get_tensor_dtype(name)]

    def _bind(self, feeds: Dict[str, "object"]) -> Dict[str, "object"]:
        torch = self._torch
        for name in self._inputs:
            tensor = torch.as_tensor(feeds[name]).to("cuda", dtype=self._torch_dtype(name)).contiguous()
            feeds[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def run(self, inputs: Inputs) -> List[np.ndarray]:
        feeds = dict(self.feeds(inputs))
        outputs = self._bind(feeds)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RunnerError(f"{self.plan_path}: TensorRT execution failed")
        self.stream.synchronize()
        return [outputs[n].float().cpu().numpy() if outputs[n].dtype == self._torch.bfloat16 else outputs[n].cpu().numpy() for n in self._outputs]

    def measure_device_latency(self, *, batch_size: int = 1, warmup: int = 10, iterations: int = 100) -> LatencyStats:
        """GPU time of ``execute_async_v3`` with CUDA events (inputs already on the device)."""
        torch = self._torch
        feeds = {}
        for name in self._inputs:
            shape = list(self.engine.get_tensor_shape(name))
            shape = [batch_size if (i == 0 and d < 0) else d for i, d in enumerate(shape)]
            feeds[name] = torch.randn(shape).to(self._torch_dtype(name)) if self._torch_dtype(name).is_floating_point else torch.zeros(shape, dtype=self._torch_dtype(name))
        self._bind(feeds)
        for _ in range(warmup):
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        samples = []
        for _ in range(iterations):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(self.stream)
            self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1000.0)
        return LatencyStats.from_samples(samples, batch_size)

    def close(self) -> None:
        self.context = None
        self.engine = None


__all__ = ["TensorRTRunner"]


def measure_engine_latency(plan_path: Union[str, Path], *, batch_size: int = 1, warmup: int = 10, iterations: int = 100) -> LatencyStats:
    """Median GPU latency of a built engine on random inputs (needs TensorRT and a CUDA GPU)."""
    with TensorRTRunner(plan_path) as runner:
        return runner.measure_device_latency(batch_size=batch_size, warmup=warmup, iterations=iterations)
