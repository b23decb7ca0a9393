"""Accuracy-targeted mixed precision: keep the fewest, most sensitive layers in FP16.

Given a maximum metric drop vs FP32, layers leave INT8 (input and weight
quantizers off, so TensorRT runs them in FP16) in sensitivity order, most
sensitive first, until the target is met or no layer is left.

The search is greedy over that fixed order: it evaluates prefixes of 1, 2, 4,
8, ... layers until one meets the target, then bisects between the last
failing and the first passing prefix. That finds the shortest passing prefix
in O(log n) evaluations when more layers in float never hurt (which the
evaluations themselves check: only a set that was measured to pass is
returned). Because the order is an estimate (measured for the top candidates,
proxied for the rest), a last pruning step tries to give the prefix's least
sensitive layers back to INT8 one at a time, within a small evaluation budget.

In this fake-quantized PyTorch evaluation the layers kept out of INT8 compute
in the model's floating-point dtype; FP16 rounding (about 1e-3 relative) is far
below INT8's, so the measured metric is what the FP16 layers will give.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from quantlab.api import current_scales
from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.evaluate import evaluate
from quantlab.evaluation.sensitivity import improvement, layers_in_float
from quantlab.evaluation.tasks import Task
from quantlab.scales import Scales


@dataclasses.dataclass
class MixedPrecisionResult:
    """What the search found.

    Attributes:
        metric: The metric targeted.
        fp32: FP32 value.
        int8: All-INT8 value.
        value: Value with ``float_layers`` kept in FP16.
        max_drop: Allowed drop (metric units; for a relative target, already converted).
        met: Whether ``value`` is within ``max_drop`` of FP32.
        float_layers: Layers kept in FP16, most sensitive first.
        evaluations: ``(number of layers in float, value)`` for every evaluation.
        scales: Scales without the float layers (their entries removed and
            their names in ``float_layers``); None if every layer had to stay in float.
        seconds: Wall time.
    """

    metric: str
    fp32: float
    int8: float
    value: float
    max_drop: float
    met: bool
    float_layers: List[str]
    evaluations: List[Tuple[int, float]]
    scales: Optional[Scales]
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {
            "metric": self.metric, "fp32": self.fp32, "int8": self.int8, "value": self.value, "max_drop": self.max_drop,
            "met": self.met, "float_layers": list(self.float_layers),
            "evaluations": [list(e) for e in self.evaluations], "seconds": self.seconds,
        }


def drop_of(task: Task, metric: str, value: float, fp32: float) -> float:
    """How much worse than FP32 ``value`` is (positive = worse)."""
    return -improvement(task, metric, value, fp32)


def allowed_drop(fp32: float, max_drop: float, relative: bool) -> float:
    """The drop allowed in metric units (``relative``: a fraction of the FP32 value)."""
    if max_drop < 0 or math.isnan(max_drop):
        raise EvaluationError(f"max drop must be >= 0, got {max_drop}")
    return abs(fp32) * max_drop if relative else max_drop


def without_layers(scales: Scales, layers: Sequence[str]) -> Scales:
    """``scales`` with ``layers`` moved to float (entries removed, listed in ``float_layers``)."""
    remaining = {e.module for e in scales.entries} - set(layers)
    if not remaining:
        raise EvaluationError("every quantized layer would be kept in float: there is nothing left to run in INT8")
    return scales.without_layers(list(layers))


def auto_precision(
    quant_model: nn.Module,
    task: Task,
    batches: Sequence[Any],
    *,
    metric: str,
    fp32_value: float,
    order: Sequence[str],
    max_drop: float,
    relative: bool = False,
    int8_value: Optional[float] = None,
    scales: Optional[Scales] = None,
    prune_evaluations: int = 8,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> MixedPrecisionResult:
    """Finds a short list of layers to keep in float that meets ``max_drop``.

    First the shortest passing prefix of ``order`` (doubling, then bisection),
    then up to ``prune_evaluations`` attempts to give its least sensitive layers
    back to INT8.

    Args:
        quant_model: The calibrated quantized model (left as it was afterwards).
        task: The task (with its FP32 reference set for ``batches``).
        batches: Eval batches.
        metric: The metric to hold.
        fp32_value: FP32 metric on ``batches``.
        order: Layer names, most sensitive first (a sensitivity ranking).
        max_drop: Largest acceptable drop vs FP32 (metric units, or a fraction
            of the FP32 value with ``relative``).
        relative: Interpret ``max_drop`` as a fraction (0.1 = 10%).
        int8_value: All-INT8 metric on ``batches`` if already measured.
        scales: The calibrated scales to cut down (default: the model's current ones).
        prune_evaluations: Evaluations spent giving layers of the passing prefix
            back to INT8 (0 = keep the prefix).
        progress: ``progress(stage, done, total)``.

    Returns:
        A :class:`MixedPrecisionResult`; ``met`` is False when even all of
        ``order`` in float misses the target (then ``float_layers`` is all of it).
    """
    start = time.perf_counter()
    limit = allowed_drop(fp32_value, max_drop, relative)
    base_scales = scales if scales is not None else current_scales(quant_model)
    evaluations: List[Tuple[int, float]] = []
    results: Dict[Tuple[str, ...], float] = {}

    def value_of(layers: Sequence[str]) -> float:
        key = tuple(layers)
        if key in results:
            return results[key]
        if not key and int8_value is not None:
            value = int8_value
        else:
            with layers_in_float(quant_model, list(key)):
                value = evaluate(quant_model, task, batches).metrics[metric]
        results[key] = value
        evaluations.append((len(key), value))
        if progress is not None:
            progress("mixed precision", len(evaluations), 0)
        return value

    def ok(layers: Sequence[str]) -> bool:
        value = value_of(layers)
        return not math.isnan(value) and drop_of(task, metric, value, fp32_value) <= limit

    def prefix(n: int) -> Tuple[str, ...]:
        return tuple(order[:n])

    int8 = value_of(())
    if ok(()):
        best = 0
    else:
        lo, n = 0, 1  # lo: largest prefix known to fail
        while n < len(order) and not ok(prefix(n)):
            lo, n = n, min(2 * n, len(order))
        if n >= len(order):
            n = len(order)
            if not ok(prefix(n)):
                best = n
                n = -1
        if n >= 0:
            hi = n  # smallest prefix known to pass
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ok(prefix(mid)):
                    hi = mid
                else:
                    lo = mid
            best = hi
    chosen = list(prefix(best))
    if ok(chosen) and len(chosen) > 1:
        # Prune: the order is only an estimate, so give layers back to INT8, least sensitive first,
        # keeping each removal that still meets the target (bounded number of evaluations).
        for layer in list(reversed(chosen))[:prune_evaluations]:
            candidate = [name for name in chosen if name != layer]
            if candidate and ok(candidate):
                chosen = candidate
    float_layers = chosen
    value = value_of(chosen)
    met = ok(chosen)
    return MixedPrecisionResult(
        metric=metric,
        fp32=fp32_value,
        int8=int8,
        value=value,
        max_drop=limit,
        met=met,
        float_layers=float_layers,
        evaluations=evaluations,
        scales=without_layers(base_scales, float_layers) if set({e.module for e in base_scales.entries}) - set(float_layers) else None,
        seconds=time.perf_counter() - start,
    )
