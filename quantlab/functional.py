"""Functional fake quantization on PyTorch's native ops.

``torch.fake_quantize_per_tensor_affine`` / ``per_channel_affine`` compute
``clamp(round_half_even(x * (1 / scale)), qmin, qmax) * scale`` and their backward
is the clipped straight-through estimator (gradient 1 inside the grid, 0 outside),
exactly what INT8 QAT needs. They also export to ONNX QuantizeLinear /
DequantizeLinear pairs.
"""
from __future__ import annotations

import torch

from quantlab.config import QuantizerSpec

#: An amax below this is treated as this value. A zero range (a channel of zero
#: weights, an activation that was always 0) would otherwise give scale 0 and NaN.
MIN_AMAX = 2.0**-30


def scale_from_amax(amax: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """``scale = amax / (2^(b-1) - 1)`` as float32 (``amax / 127`` for INT8)."""
    return (amax.detach().to(torch.float32).clamp_min(MIN_AMAX) / spec.bound).to(torch.float32)


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Symmetric fake quantization of ``x`` with range ``[-amax, amax]``.

    Args:
        x: Tensor to quantize (float32; other float dtypes are computed in float32).
        amax: Scalar tensor (per-tensor) or 1-D tensor of ``x.shape[spec.axis]``
            values (per-channel).
        spec: Bits, narrow range and axis.

    Returns:
        A tensor of ``x``'s dtype holding the dequantized values. Gradients pass
        straight through inside the range and are zero outside.
    """
    scale = scale_from_amax(amax, spec)
    orig_dtype = x.dtype
    if orig_dtype != torch.float32:
        x = x.to(torch.float32)
    if spec.axis is None:
        zero_point = torch.zeros((), dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()), zero_point, spec.quant_min, spec.quant_max
        )
    else:
        axis = spec.axis % x.dim()
        zero_point = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
        out = torch.fake_quantize_per_channel_affine(
            x, scale.reshape(-1), zero_point, axis, spec.quant_min, spec.quant_max
        )
    return out if orig_dtype == torch.float32 else out.to(orig_dtype)


def amax_of_weight(weight: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Max of ``|weight|`` per channel along ``spec.axis`` (or over all, per-tensor)."""
    w = weight.detach().abs()
    if spec.axis is None:
        return w.amax().to(torch.float32)
    axis = spec.axis % w.dim()
    dims = [d for d in range(w.dim()) if d != axis]
    return w.amax(dim=dims).to(torch.float32) if dims else w.to(torch.float32)
