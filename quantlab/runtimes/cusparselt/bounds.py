"""The error bound of the INT8 runners' output against the exact dequantized product.

Both runners multiply the fake-quant model's own integers (``q_x``,
``q_w``) with INT32 accumulation, which is exact (``|acc| <= K * 128 * 127 < 2^31``
for K < 132,000), so they differ from the exact dequantized product
``y* = s_x * s_w[n] * acc + b[n]`` (float64 here) only by the rounding of the
dequantization: a few float32 roundings (``acc`` to float, ``s_x * s_w``, the multiply,
the bias add: at most 2^-21 of ``|s_x s_w acc| + |b|`` in all, generously) and one
rounding to float16 (half an ulp: 2^-11 of ``|y*|``, or 2^-25 below FP16's normal range)::

    |y - y*| <= 2^-11 * |y*| + 2^-21 * (|s_x s_w acc| + |b|) + 2^-24

That holds for the dense path (INT32 result, then quantlab's dequantize kernel in FP32)
and for the sparse path with an INT32 result. cuSPARSELt's fused INT8 -> FP16 epilogue
(the per-channel scale vector and the bias inside the GEMM) works in FP16, which adds
``2^-11 * (3 |s_x s_w acc| + |b|)`` to the bound (``fp16_intermediate``).

Its own module (pure arithmetic): the runners (:mod:`.linear`, choosing an epilogue) and
the checks (:mod:`.verify`) both use it.
"""
from __future__ import annotations

from typing import Optional

import torch

FP16_HALF_ULP = 2.0**-11
FP32_SLACK = 2.0**-21
ABS_FLOOR = 2.0**-24


def dequantization_bound(reference: torch.Tensor, scaled_acc: torch.Tensor, bias: Optional[torch.Tensor], *,
                         roundings: int = 1, fp16_intermediate: bool = False) -> torch.Tensor:
    """The per-element bound above (float64), for the exact ``reference`` and ``s_x s_w acc``.

    ``fp16_intermediate``: the bound of an epilogue that works in FP16 (the INT32 sum and the
    scale converted to FP16, their product and the bias add each rounded to FP16): up to three
    more FP16 roundings of ``|s_x s_w acc|`` and one of ``|b|``. cuSPARSELt's fused INT8 -> FP16
    epilogue (scale vector and bias in the GEMM) measured within this bound on an H200
    (cuSPARSELt 0.8.0) and far outside the one-rounding bound where ``s acc`` and ``-b`` nearly
    cancel, so its precision is FP16's, not FP32's.
    """
    magnitude = scaled_acc.abs() + (bias.abs() if bias is not None else 0.0)
    bound = roundings * FP16_HALF_ULP * reference.abs() + FP32_SLACK * magnitude + ABS_FLOOR
    if fp16_intermediate:
        bound = bound + FP16_HALF_ULP * (3 * scaled_acc.abs() + (bias.abs() if bias is not None else 0.0))
    return bound


__all__ = ["ABS_FLOOR", "FP16_HALF_ULP", "FP32_SLACK", "dequantization_bound"]
