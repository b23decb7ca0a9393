"""Correctness of the INT8 runners against the exact result and against the fake-quant layer.

The runners' outputs are checked against the exact dequantized product within the bound
of :mod:`quantlab.runtimes.cusparselt.bounds` (the one-rounding bound, and the FP16
epilogue's where cuSPARSELt's fused INT8 -> FP16 epilogue ran); the raw INT32
accumulators are compared for exact equality.

The fake-quant layer itself (float32 ``fake_quant(x) @ fake_quant(W)^T + b``) is one more
float32 GEMM away from ``y*``; :func:`check_layer` reports that difference as measured.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from quantlab.runtimes.cusparselt.bounds import ABS_FLOOR, FP16_HALF_ULP, FP32_SLACK, dequantization_bound


def _ratio(y: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    return float(((y.double() - reference).abs() / bound).max())


def check_layer(module: nn.Module, x: torch.Tensor, *, sparse: Optional[nn.Module] = None, dense: Optional[nn.Module] = None,
                lib: Any = None, name: str = "") -> Dict[str, Any]:
    """Checks the INT8 runners of one quantized Linear layer on input ``x`` (FP16, CUDA).

    Args:
        module: The quantlab fake-quant ``nn.Linear`` (quantizers attached and calibrated).
        x: Input rows ``[T, K]``.
        sparse / dense: Runner modules built from ``module`` (either may be None).
        lib: The cuSPARSELt shim, to also compare raw INT32 accumulators (sparse only).

    Returns:
        ``exact_int32`` (sparse INT32 accumulators equal the exact ones), ``*_bound_ratio``
        (max error over the bound: <= 1 passes), ``*_vs_fakequant_rel`` (max |difference|
        over max |fake-quant output|) and ``quantize_exact`` (the runner's INT8 input
        equals the fake-quant integers).
    """
    from quantlab.attach import quantization_disabled
    from quantlab.runtimes.cusparselt.convert import int8_params
    from quantlab.runtimes.cusparselt.kernels import quantize_int8

    params = int8_params(module, name)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    q = quantize_int8(flat, params.inv_input_scale.to(flat.device))
    # The fake-quant integers of the input: round(x * (1/s)) clamped, in float32 as PyTorch does.
    q_fake = torch.clamp(torch.round(flat.float() * params.inv_input_scale.to(flat.device)), -128, 127)
    acc = q.double() @ params.weight.double().t()
    alpha = params.alpha.double()
    bias = params.bias.double() if params.bias is not None else None
    reference = acc * alpha + (bias if bias is not None else 0.0)
    report: Dict[str, Any] = {"layer": name, "tokens": int(flat.shape[0]), "in": int(flat.shape[1]), "out": params.weight.shape[0],
                              "quantize_exact": bool(torch.equal(q.float(), q_fake))}
    with torch.no_grad():
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            fake = module(flat.float()).double()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was
        scale = float(fake.abs().max()) or 1.0
        report["fakequant_vs_exact_rel"] = float((fake - reference).abs().max()) / scale
        for label, runner in (("sparse", sparse), ("dense", dense)):
            if runner is None:
                continue
            y = runner(flat)
            fused = label == "sparse" and getattr(runner, "epilogue", "int32") != "int32"
            report[f"{label}_bound_ratio"] = _ratio(y, reference, dequantization_bound(reference, acc * alpha, bias))
            if fused:
                report["sparse_epilogue_bound_ratio"] = _ratio(
                    y, reference, dequantization_bound(reference, acc * alpha, bias, fp16_intermediate=True))
            report[f"{label}_vs_fakequant_rel"] = float((y.double() - fake).abs().max()) / scale
        if sparse is not None and lib is not None:
            report["exact_int32"] = _int32_matches(sparse, q, acc, lib)
        with quantization_disabled(module):
            report["float_vs_fakequant_rel"] = float((module(flat.float()).double() - fake).abs().max()) / scale
    return report


def _int32_matches(sparse: nn.Module, q: torch.Tensor, acc: torch.Tensor, lib: Any) -> Any:
    """Whether a raw INT8 x INT8 -> INT32 sparse GEMM of the same weight gives the exact accumulators."""
    from quantlab.runtimes.cusparselt.linear import int32_matmul

    try:
        equal, alpha_type = int32_matmul(lib, sparse.weight_int8, q, acc)
        return equal
    except Exception as exc:  # noqa: BLE001 - an unsupported output type is reported, not fatal
        return f"not run: {exc}"[:200]


__all__ = ["ABS_FLOOR", "FP16_HALF_ULP", "FP32_SLACK", "check_layer", "dequantization_bound"]
