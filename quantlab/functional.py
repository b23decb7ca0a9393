"""Functional fake quantization on PyTorch's native ops.

``torch.fake_quantize_per_tensor_affine`` / ``per_channel_affine`` compute
``clamp(round_half_even(x * (1 / scale)), qmin, qmax) * scale`` and their backward
is the clipped straight-through estimator (gradient 1 inside the grid, 0 outside),
exactly what INT8 QAT needs. They also export to ONNX QuantizeLinear /
DequantizeLinear pairs.
"""
from __future__ import annotations

from typing import Optional

import torch

from quantlab.config import QuantizerSpec

#: An amax below this is treated as this value. A zero range (a channel of zero
#: weights, an activation that was always 0) would otherwise give scale 0 and NaN.
MIN_AMAX = 2.0**-30


def scale_from_amax(amax: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """``scale = amax / (2^(b-1) - 1)`` as float32 (``amax / 127`` for INT8)."""
    return (amax.detach().to(torch.float32).clamp_min(MIN_AMAX) / spec.bound).to(torch.float32)


_ZERO_POINTS: dict = {}


def _zero_points(device: torch.device, count: int) -> torch.Tensor:
    """Int32 zeros for the native ops (0-d if ``count`` is 0), one cached tensor per device and size.

    Allocating them per call was one more kernel launch per quantizer per step.
    """
    if _tracing():  # exporters and compilers get a fresh constant
        return torch.zeros(count or (), dtype=torch.int32, device=device)
    key = (device, count)
    zeros = _ZERO_POINTS.get(key)
    if zeros is None:
        zeros = _ZERO_POINTS[key] = torch.zeros(count or (), dtype=torch.int32, device=device)
    return zeros


def fake_quantize(x: torch.Tensor, amax: torch.Tensor, spec: QuantizerSpec, *, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric fake quantization of ``x`` with range ``[-amax, amax]``.

    Args:
        x: Tensor to quantize (float32; other float dtypes are computed in float32).
        amax: Scalar tensor (per-tensor) or 1-D tensor of ``x.shape[spec.axis]``
            values (per-channel).
        spec: Bits, narrow range and axis.
        scale: ``scale_from_amax(amax, spec)`` if the caller already has it.

    Returns:
        A tensor of ``x``'s dtype holding the dequantized values. Gradients pass
        straight through inside the range and are zero outside.
    """
    scale = scale_from_amax(amax, spec) if scale is None else scale
    orig_dtype = x.dtype
    if orig_dtype != torch.float32:
        x = x.to(torch.float32)
    if spec.axis is None:
        zero_point = _zero_points(x.device, 0)
        out = torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()), zero_point, spec.quant_min, spec.quant_max
        )
    else:
        axis = spec.axis % x.dim()
        if x.is_cuda and not _tracing():
            out = _PerChannelFakeQuantize.apply(x, scale.reshape(-1), axis, spec.quant_min, spec.quant_max)
        else:
            zero_point = _zero_points(x.device, scale.numel())
            out = torch.fake_quantize_per_channel_affine(
                x, scale.reshape(-1), zero_point, axis, spec.quant_min, spec.quant_max
            )
    return out if orig_dtype == torch.float32 else out.to(orig_dtype)


def _tracing() -> bool:
    """True while exporting or compiling: then the native op, which exports to Q/DQ, is kept."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class _PerChannelFakeQuantize(torch.autograd.Function):
    """``torch.fake_quantize_per_channel_affine`` with zero point 0, bit for bit, without its host sync.

    The native op reads the zero points' min and max back to the host to check
    them: two device synchronizations per call, i.e. per weight per training
    step on the GPU, which serialized the host and the GPU and cost about 40%
    of a ResNet-18 QAT step on an H100 (benchmarks/check_qat_sync.py). With zero
    points fixed at 0 there is nothing to check. Same arithmetic as the native
    kernel: ``q = nearbyint(x * (1 / scale))`` in float32, ``clamp(q) * scale``;
    the gradient is the clipped straight-through estimator.
    """

    @staticmethod
    def forward(ctx, x, scale, axis: int, quant_min: int, quant_max: int):  # type: ignore[override]
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.view(shape)
        q = torch.mul(x, torch.reciprocal(scale)).round_()
        clamped = q.clamp(quant_min, quant_max)
        ctx.save_for_backward(q == clamped)  # inside the grid
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None


def amax_of_weight(weight: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Max of ``|weight|`` per channel along ``spec.axis`` (or over all, per-tensor)."""
    # The infinity norm is max |w| in one reduction (abs() then amax() was two kernels and a
    # weight-sized temporary, per weight per QAT step with recomputed ranges); same values.
    # No gradient flows into a range: no_grad rather than a detach (one operation less per weight).
    with torch.no_grad():
        if spec.axis is None:
            amax = torch.linalg.vector_norm(weight, ord=float("inf"))
        else:
            axis = spec.axis % weight.dim()
            dims = [d for d in range(weight.dim()) if d != axis]
            amax = torch.linalg.vector_norm(weight, ord=float("inf"), dim=dims) if dims else weight.abs()
        return amax if amax.dtype == torch.float32 else amax.to(torch.float32)
