"""LSQ-style fake quantization with a learnable range (amax).

Learned Step Size Quantization (Esser et al., 2020) learns the step size ``s``
with the straight-through estimator for rounding:

* ``d x_hat / d x = 1`` where ``round(x / s)`` lies on the grid ``[qmin, qmax]``,
  else 0 (the clipped STE, identical to PyTorch's fake-quant ops);
* ``d x_hat / d s = round(x / s) - x / s`` on the grid, ``qmin`` or ``qmax`` where
  the value is clipped;
* the step-size gradient is scaled by ``g = 1 / sqrt(N * qmax)`` (``N`` = number of
  elements sharing the step size) so that it has the magnitude of the weight
  gradients.

quantlab stores ``amax = s * bound`` (``bound = 127`` for INT8), so the gradient of
``amax`` is ``g / bound * sum(dL/dx_hat * dx_hat/ds)``.

This is a custom autograd function rather than
``torch._fake_quantize_learnable_per_tensor_affine`` because that op reads the
scale with ``.item()`` (a device sync per quantizer per step on the GPU); the
tests check both give the same gradients. For the same reason per-channel
ranges on CUDA are fake-quantized with plain ops: the native per-channel op
reads its zero points back to the host (two syncs per weight per step).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from quantlab.config import QuantizerSpec
from quantlab.functional import MIN_AMAX, _zero_points


def lsq_grad_factor(x: torch.Tensor, spec: QuantizerSpec) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)``.

    ``N`` is the number of elements that share one step size: the whole tensor
    per-tensor, the elements of one channel per-channel.
    """
    numel = x.numel()
    if spec.axis is not None:
        numel = numel // max(1, x.shape[spec.axis % x.dim()])
    return 1.0 / math.sqrt(max(1, numel) * spec.quant_max)


def _channel_shape(x: torch.Tensor, axis: Optional[int]) -> Tuple[int, ...]:
    if axis is None:
        return ()
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return tuple(shape)


_ENABLED: dict = {}


def _fake_quant_enabled(device: torch.device) -> torch.Tensor:
    """The native per-tensor op's ``fake_quant_enabled`` flag (1), one cached tensor per device."""
    flag = _ENABLED.get(device)
    if flag is None:
        flag = _ENABLED[device] = torch.ones(1, dtype=torch.long, device=device)
    return flag


def _fake_quantize_with_mask(x: torch.Tensor, scale: torch.Tensor, spec: QuantizerSpec,
                             plain_ops: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fake_quantize(x)`` (float32) and its on-the-grid mask, without a host sync.

    Per tensor: the native op's cachemask form (what ``fake_quantize_per_tensor_affine``
    runs), one kernel for both. Per channel on CUDA: the native op's arithmetic
    (``nearbyint(x * (1 / scale))``, clamp, ``* scale``) in plain ops, because the
    native op reads its zero points back to the host twice per call (a sync per
    weight per training step); on the CPU the native cachemask op. ``plain_ops``
    forces either per-channel branch (tests).
    """
    if spec.axis is None:
        return torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale.reshape(()), _zero_points(x.device, 0), _fake_quant_enabled(x.device), spec.quant_min, spec.quant_max)
    axis = spec.axis % x.dim()
    if not (x.is_cuda if plain_ops is None else plain_ops):
        return torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            x, scale.reshape(-1), _zero_points(x.device, scale.numel()), axis, spec.quant_min, spec.quant_max)
    s = scale.reshape(_channel_shape(x, axis))
    q = torch.mul(x, torch.reciprocal(s)).round_()
    clamped = q.clamp(spec.quant_min, spec.quant_max)
    inside = q == clamped  # before the in-place scaling below
    return clamped.mul_(s), inside


class _LSQFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, amax, spec: QuantizerSpec, grad_factor: float):  # type: ignore[override]
        xf = x.to(torch.float32)
        amax_f = amax.to(torch.float32)
        scale = amax_f.clamp_min(MIN_AMAX) / spec.bound
        out, inside = _fake_quantize_with_mask(xf, scale, spec)
        # The mask from the forward: the backward then needs no second comparison pass for x's gradient.
        ctx.save_for_backward(x, amax_f, scale, inside)
        ctx.spec = spec
        ctx.grad_factor = grad_factor
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, amax, scale, inside = ctx.saved_tensors
        spec: QuantizerSpec = ctx.spec
        g = grad_out.to(torch.float32)
        grad_x = (g * inside).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_amax = None
        if ctx.needs_input_grad[1]:
            shape = _channel_shape(x, spec.axis)
            s = scale.reshape(shape) if shape else scale
            # Same arithmetic as the forward kernel (x * (1 / scale), round half to even).
            v = x.to(torch.float32) * (1.0 / s)
            q = torch.round(v).clamp_(spec.quant_min, spec.quant_max)
            # d x_hat / d s: round(v) - v on the grid, qmin or qmax where clipped (in place: v is spent).
            dq_ds = q.sub_(v.mul_(inside))
            if spec.axis is None:
                grad_scale = torch.vdot(g.reshape(-1), dq_ds.reshape(-1))
            else:
                axis = spec.axis % x.dim()
                dims = [d for d in range(x.dim()) if d != axis]
                contrib = dq_ds.mul_(g)
                grad_scale = contrib.sum(dim=dims) if dims else contrib
            grad_amax = grad_scale * (ctx.grad_factor / spec.bound)
            # amax is clamped at MIN_AMAX in the forward: no gradient below the clamp.
            grad_amax = torch.where(amax >= MIN_AMAX, grad_amax, 0.0).reshape(amax.shape)
        return grad_x, grad_amax, None, None


def lsq_fake_quantize(x: torch.Tensor, amax: torch.Tensor, spec: QuantizerSpec, grad_factor: Optional[float] = None) -> torch.Tensor:
    """Fake-quantizes ``x`` to ``[-amax, amax]`` with gradients for both ``x`` and ``amax``.

    Args:
        x: The tensor (any float dtype; computed in float32).
        amax: Scalar (per-tensor) or one value per channel along ``spec.axis``; usually a Parameter.
        spec: Bits, narrow range, axis.
        grad_factor: Scale of the amax gradient (default :func:`lsq_grad_factor`).

    Returns:
        Same values as :func:`quantlab.functional.fake_quantize`.
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, spec)
    return _LSQFakeQuantize.apply(x, amax, spec, float(grad_factor))
