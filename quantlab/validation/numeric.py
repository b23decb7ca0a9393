"""The bounds of a range (amax) and of the scale a Q/DQ node or a calibration cache stores.

A scale is ``amax / (2^(b-1) - 1)``, stored as float32 (or float16 in an FP16
Q/DQ graph). TensorRT needs it finite and > 0; a subnormal scale is flushed to
zero by the GPU's arithmetic (and its reciprocal overflows), so it must be a
NORMAL number of the dtype that stores it. The amax itself lives in a float32
buffer, so it must fit float32.

Zero ranges: a zero input amax quantizes every activation to 0 (a model that
scored 92.8% top-1 scored 8.8% with one edited amax). quantlab never writes one:
a layer whose calibration saw only zeros keeps floating-point inputs (like a
layer that saw no data), and a file holding one is refused. A zero WEIGHT amax
(a channel whose weights are all zero, e.g. pruned) is exact and allowed (the
model's weights are checked against it when the file is loaded). Every amax
below :data:`quantlab.functional.MIN_AMAX` gets that floor's scale (2^-30 / 127,
a normal float32), in fake quantization, Q/DQ export and calibration caches alike.
"""
from __future__ import annotations

import math
from typing import Any, List, Sequence, Type

import numpy as np

from quantlab.errors import FileFormatError
from quantlab.validation.fields import check_number, is_number, type_name

FP32_MAX = float(np.finfo(np.float32).max)
FP32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
FP16_MAX = float(np.finfo(np.float16).max)
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)

#: Widths quantlab's fake quantization supports (QuantizerSpec).
CONFIG_NUM_BITS = range(2, 9)
#: Widths TensorRT's INT8 paths (Q/DQ ONNX, calibration cache) take.
TENSORRT_NUM_BITS = (8,)
#: Most channels one per-channel amax list may hold (bounds the work of a mutated file).
MAX_CHANNELS = 1 << 20


def bound_of(num_bits: int) -> int:
    """``2^(b-1) - 1``: 127 for 8 bits."""
    return (1 << (num_bits - 1)) - 1


def effective_scale(amax: float, num_bits: int = 8) -> float:
    """The float32 scale quantlab computes for ``amax`` (the fake quantizer's and the exporter's formula)."""
    from quantlab.functional import MIN_AMAX

    return float(np.float32(max(float(amax), MIN_AMAX) / bound_of(num_bits)))


def scale_problem(scale: float, dtype: str = "float32") -> str:
    """Why ``scale`` cannot be a TensorRT scale stored as ``dtype``; empty if it can."""
    if math.isnan(scale) or math.isinf(scale):
        return f"{scale!r} is not finite"
    if scale <= 0:
        return f"{scale!r} is not > 0"
    low, high = (FP16_MIN_NORMAL, FP16_MAX) if dtype == "float16" else (FP32_MIN_NORMAL, FP32_MAX)
    if scale < low:
        return f"{scale!r} is below the smallest normal {dtype} ({low:.3g}): the GPU flushes it to 0"
    if scale > high:
        return f"{scale!r} overflows {dtype} (max {high:.3g})"
    return ""


def check_scale(scale: Any, where: str, dtype: str = "float32", error: Type[Exception] = FileFormatError) -> float:
    """A scale as float, or ``error`` naming ``where``."""
    if not is_number(scale):
        raise error(f"{where}: scale must be a number, got {type_name(scale)}")
    problem = scale_problem(float(scale), dtype)
    if problem:
        raise error(f"{where}: scale {problem}; TensorRT needs a finite, normal scale > 0")
    return float(scale)


def check_num_bits(value: Any, where: str, error: Type[Exception] = FileFormatError, *, allowed: Sequence[int] = CONFIG_NUM_BITS) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where}: num_bits must be an integer, got {type_name(value)} {value!r}"[:200])
    if value not in allowed:
        shown = f"{min(allowed)}..{max(allowed)}" if len(allowed) > 2 else " or ".join(map(str, allowed))
        raise error(f"{where}: num_bits {value} is not supported (quantlab fake-quantizes {shown} bits; TensorRT INT8 takes 8)")
    return value


def check_amax_value(value: Any, where: str, *, role: str, num_bits: int, error: Type[Exception] = FileFormatError) -> float:
    """One amax: finite, fits float32, gives a normal float32 scale; 0 only for weights."""
    number = check_number(value, f"{where}: amax", error=error)
    if number < 0:
        raise error(f"{where}: amax must be >= 0 (it is a magnitude), got {value!r}")
    if number > FP32_MAX:
        raise error(f"{where}: amax {value!r} does not fit float32 (max {FP32_MAX:.4g}); the range is stored as float32")
    if number == 0:
        if role == "input":
            raise error(
                f"{where}: amax is 0, which quantizes every activation to 0. A layer whose calibration saw only zeros "
                "keeps floating-point inputs in quantlab (its input entry is left out): remove this entry, or recalibrate "
                "with data that reaches the layer"
            )
        return number  # an all-zero weight channel: exact at any scale
    problem = scale_problem(effective_scale(number, num_bits))
    if problem:
        raise error(f"{where}: amax {value!r} gives scale {problem}")
    return number


def check_amax(value: Any, where: str, *, role: str, num_bits: int, error: Type[Exception] = FileFormatError) -> Any:
    """A scalar amax or a per-channel list, each element as :func:`check_amax_value`."""
    if isinstance(value, list):
        if not value:
            raise error(f"{where}: a per-channel amax list must not be empty")
        if len(value) > MAX_CHANNELS:
            raise error(f"{where}: amax holds {len(value)} channels (at most {MAX_CHANNELS})")
        out: List[float] = []
        for i, item in enumerate(value):
            out.append(check_amax_value(item, f"{where}[channel {i}]", role=role, num_bits=num_bits, error=error))
        return out
    return check_amax_value(value, where, role=role, num_bits=num_bits, error=error)


__all__ = [
    "CONFIG_NUM_BITS",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP32_MAX",
    "FP32_MIN_NORMAL",
    "MAX_CHANNELS",
    "TENSORRT_NUM_BITS",
    "bound_of",
    "check_amax",
    "check_amax_value",
    "check_num_bits",
    "check_scale",
    "effective_scale",
    "scale_problem",
]
