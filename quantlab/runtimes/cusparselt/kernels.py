"""The element-wise steps around an INT8 GEMM: quantize the input, dequantize an INT32 result.

Both compute exactly what quantlab's fake quantization computes (so the integer
operands of the GEMM are the fake-quant model's integers, bit for bit):

* quantize: ``q = clamp(rint(float32(x) * float32(1 / scale)), -128, 127)`` (round half
  to even, the formula of ``torch.fake_quantize_per_tensor_affine``);
* dequantize: ``y = float16(float32(acc) * alpha[col] + bias[col])`` with
  ``alpha = s_x * s_w[col]``.

On CUDA with Triton each is one fused kernel (one read, one write); elsewhere, or if
Triton is missing, plain PyTorch ops compute the same values.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # pragma: no cover - Triton exists only on GPU machines
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _quantize_kernel(x_ptr, out_ptr, inv_scale_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = libdevice.rint(x * tl.load(inv_scale_ptr))
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(out_ptr + offs, q.to(tl.int8), mask=mask)

    @triton.jit
    def _dequantize_kernel(acc_ptr, alpha_ptr, bias_ptr, out_ptr, numel, cols, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        col = offs % cols
        y = tl.load(acc_ptr + offs, mask=mask, other=0).to(tl.float32) * tl.load(alpha_ptr + col, mask=mask, other=0.0)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(tl.float16), mask=mask)

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - ImportError, or a Triton without libdevice
    HAVE_TRITON = False

_BLOCK = 4096
#: Set to False to force the PyTorch path (tests compare both).
use_triton = True


def _triton_ok(t: torch.Tensor) -> bool:
    return HAVE_TRITON and use_triton and t.is_cuda and t.is_contiguous()


def quantize_int8(x: torch.Tensor, inv_scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """INT8 values of ``x`` for a per-tensor scale, given ``inv_scale = 1 / scale`` (float32, 1 element)."""
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device) if out is None else out
    if _triton_ok(x):
        numel = x.numel()
        _quantize_kernel[(triton.cdiv(numel, _BLOCK),)](x, out, inv_scale, numel, BLOCK=_BLOCK)
        return out
    q = torch.mul(x.to(torch.float32), inv_scale.reshape(())).round_().clamp_(-128, 127)
    return out.copy_(q)


def dequantize_int32(acc: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``float16(acc * alpha[col] + bias[col])`` for an INT32 ``acc`` of shape [rows, cols]."""
    if _triton_ok(acc):
        out = torch.empty(acc.shape, dtype=torch.float16, device=acc.device)
        numel = acc.numel()
        _dequantize_kernel[(triton.cdiv(numel, _BLOCK),)](
            acc, alpha, bias if bias is not None else alpha, out, numel, acc.shape[-1], HAS_BIAS=bias is not None, BLOCK=_BLOCK
        )
        return out
    y = acc.to(torch.float32) * alpha
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(torch.float16)


__all__ = ["HAVE_TRITON", "dequantize_int32", "quantize_int8"]
