"""Timing a model's forward on the GPU: FP16 vs its Linear layers on 2:4 sparse INT8 (or dense INT8).

:func:`measure_speedup` is what ``quantlab compare --sparsity 2:4`` records on a CUDA
device; :func:`time_call` and :func:`cast_rest` are shared with
``benchmarks/bench_sparse_gpu.py``. Timing: a CUDA graph of several calls replayed
(so launch overhead is out, as in a TensorRT engine), CUDA events, median of repeats;
eager timing where the model cannot be captured (the result says which).
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from quantlab.graph_capture import state_kept_on_failure


@dataclasses.dataclass
class Timing:
    """Median milliseconds per call, the spread of the repeats ((max - min) / median) and how it was timed."""

    ms: float
    spread: float
    how: str


def time_call(fn: Callable[[int], Any], *, device: torch.device, calls: int = 8, repeats: int = 7, graph: bool = True) -> Timing:
    """Median ms per call of ``fn(i)`` (``i`` = call index, to rotate inputs)."""
    if device.type != "cuda":
        for i in range(2):
            fn(i)
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(calls):
                fn(i)
            samples.append((time.perf_counter() - start) * 1000 / calls)
        med = statistics.median(samples)
        return Timing(med, (max(samples) - min(samples)) / med, "eager-cpu")
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    replay: Optional[Callable[[], None]] = None
    how = "eager"
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(calls):
                    fn(i)
            torch.cuda.current_stream().wait_stream(side)
            with state_kept_on_failure(), torch.cuda.graph(g):
                for i in range(calls):
                    fn(i)
            g.replay()
            torch.cuda.synchronize()
            replay, how = g.replay, "graph"
        except Exception as exc:  # noqa: BLE001 - not capturable: time eagerly and say so
            how = f"eager ({type(exc).__name__})"
            torch.cuda.synchronize()
    if replay is None:
        def replay() -> None:
            for i in range(calls):
                fn(i)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    med = statistics.median(samples)
    return Timing(med, (max(samples) - min(samples)) / med, how)


def cast_rest(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts every floating-point parameter and buffer to ``dtype`` except inside the INT8 runners."""
    from quantlab.runtimes.cusparselt.linear import _Int8LinearBase

    runners = [m for m in model.modules() if isinstance(m, _Int8LinearBase)]
    inside = {id(b) for r in runners for b in r.buffers()}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _Int8LinearBase):
                continue
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point():
                    module._parameters[key] = nn.Parameter(p.to(dtype), requires_grad=False)
            for key, b in list(module._buffers.items()):
                if b is not None and b.is_floating_point() and id(b) not in inside:
                    module._buffers[key] = b.to(dtype)
    return model


def _half_inputs(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.half() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _half_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_half_inputs(v) for v in inputs)
    return inputs


def measure_speedup(model: nn.Module, inputs: Any, *, mode: str = "sparse-int8") -> Dict[str, Any]:
    """FP16 forward vs the same model with its quantized Linear layers on INT8 kernels (CUDA).

    Args:
        model: A quantlab fake-quant model on a CUDA device (2:4-pruned for ``sparse-int8``);
            not modified. Quantized layers that are not Linear (convs) run in FP16 in both.
        inputs: One batch of the model's inputs.
        mode: ``"sparse-int8"`` or ``"int8"``.

    Returns:
        ``fp16_ms``, ``int8_ms`` (the chosen mode), ``speedup``, ``timing`` and the conversion report.
    """
    from quantlab.attach import remove_quantizers
    from quantlab.batching import call_model, model_device, to_device
    from quantlab.runtimes.cusparselt.convert import convert_linears
    from quantlab.sparsity.mask import remove_masks

    device = model_device(model)
    inputs = _half_inputs(to_device(inputs, device))
    # Copies: removing quantizers and masks from a copy leaves the model as it was (quantlab.attach).
    fp16 = copy.deepcopy(model)
    remove_quantizers(fp16)
    remove_masks(fp16)
    cast_rest(fp16, torch.float16)
    fast = copy.deepcopy(model)
    report = convert_linears(fast, mode)
    remove_quantizers(fast)  # what is left quantized (convs) runs in FP16 here
    remove_masks(fast)
    cast_rest(fast, torch.float16)
    with torch.no_grad():
        t_fp16 = time_call(lambda _i: call_model(fp16, inputs), device=device, calls=2, repeats=5)
        t_int8 = time_call(lambda _i: call_model(fast, inputs), device=device, calls=2, repeats=5)
    return {"fp16_ms": t_fp16.ms, "int8_ms": t_int8.ms, "speedup": t_fp16.ms / t_int8.ms, "mode": mode,
            "timing": f"{t_fp16.how}/{t_int8.how}", "converted": len(report.converted), "kept": report.kept}


__all__ = ["Timing", "cast_rest", "measure_speedup", "time_call"]
