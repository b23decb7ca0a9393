"""From a quantlab fake-quant model to one whose Linear layers run real INT8 GEMMs.

:func:`int8_params` reads one quantized ``nn.Linear``: the INT8 weight exactly as
the fake quantization computes it (``clamp(round(w * (1 / s_w)), -127, 127)`` of the
masked weight), the input scale and the per-channel weight scales.
:func:`convert_linears` swaps every quantized Linear for a :class:`SparseInt8Linear`
(2:4 weights) or :class:`DenseInt8Linear`, in place; the rest of the model keeps
running in its own precision (FP16 for the speed measurements).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from quantlab.attach import weight_quantizer
from quantlab.errors import QuantlabError
from quantlab.functional import scale_from_amax
from quantlab.runtimes.cusparselt.linear import DenseInt8Linear, Int8LinearParams, SparseInt8Linear
from quantlab.tensor_quantizer import QuantizerMode

MODES = ("sparse-int8", "int8")


class ConversionError(QuantlabError, ValueError):
    """A layer's quantizers do not describe an INT8 GEMM the runners can execute (names the layer)."""


def _masked_weight(module: nn.Linear) -> torch.Tensor:
    from torch.nn.utils import parametrize

    from quantlab.sparsity.mask import SparsityMask

    if not parametrize.is_parametrized(module, "weight"):
        return module.weight.detach()
    plist = module.parametrizations.weight
    weight = plist.original.detach()
    for p in plist:
        if isinstance(p, SparsityMask):
            weight = weight * p.mask
    return weight


def int8_params(module: nn.Module, name: str = "") -> Int8LinearParams:
    """The integers and scales of a quantlab-quantized ``nn.Linear``.

    Raises:
        ConversionError: not a Linear, no calibrated quantizers, or a spec the INT8
            kernels do not run (not 8-bit, a per-channel or narrow-range input).
    """
    label = name or type(module).__name__
    if not isinstance(module, nn.Linear):
        raise ConversionError(f"layer '{label}' is a {type(module).__name__}, not an nn.Linear")
    iq = module.__dict__["_modules"].get("input_quantizer")
    wq = weight_quantizer(module)
    if iq is None or wq is None:
        raise ConversionError(f"layer '{label}' has no quantizers: quantize and calibrate the model first")
    for role, q in (("input", iq), ("weight", wq)):
        if q.mode is not QuantizerMode.QUANTIZE or not q.is_calibrated:
            raise ConversionError(f"layer '{label}': the {role} quantizer is not calibrated and on (mode {q.mode.value})")
        if q.spec.num_bits != 8:
            raise ConversionError(f"layer '{label}': the {role} quantizer uses {q.spec.num_bits} bits; the kernels are INT8")
    if iq.spec.axis is not None or iq.spec.narrow_range:
        raise ConversionError(f"layer '{label}': the input must be quantized per tensor on [-128, 127]")
    weight = _masked_weight(module).to(torch.float32)
    w_scale = scale_from_amax(wq.amax, wq.spec)
    if w_scale.numel() == 1:
        w_scale = w_scale.reshape(1).expand(weight.shape[0])
    elif wq.spec.axis != 0:
        raise ConversionError(f"layer '{label}': per-channel weight scales must be on the output axis 0, not {wq.spec.axis}")
    w_scale = w_scale.reshape(-1).to(weight.device).contiguous()
    # The fake quantization's integers: x * (1 / scale), rounded half to even, clamped.
    q = torch.mul(weight, torch.reciprocal(w_scale).reshape(-1, 1)).round_().clamp_(wq.spec.quant_min, wq.spec.quant_max)
    x_scale = scale_from_amax(iq.amax, iq.spec).reshape(1).to(weight.device)
    bias = module.bias.detach().to(torch.float32) if module.bias is not None else None
    return Int8LinearParams(q.to(torch.int8).contiguous(), x_scale, w_scale, bias, label)


@dataclasses.dataclass
class ConversionReport:
    """Which layer became which runner (and why a layer stayed as it was)."""

    converted: Dict[str, str]
    kept: Dict[str, str]


def _parent(model: nn.Module, name: str) -> "tuple[nn.Module, str]":
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def convert_linears(
    model: nn.Module,
    mode: str = "sparse-int8",
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    fallback: bool = True,
    search: bool = True,
    epilogue: Optional[str] = None,
    lib=None,
) -> ConversionReport:
    """Replaces the quantized ``nn.Linear`` layers of ``model`` by INT8 runners, in place.

    Args:
        model: A quantlab fake-quant model on a CUDA device (2:4-pruned for ``sparse-int8``).
        mode: ``"sparse-int8"`` (cuSPARSELt) or ``"int8"`` (dense ``torch._int_mm``).
        include / exclude: fnmatch patterns of module names.
        fallback: In ``sparse-int8`` mode, run a layer whose weight is not 2:4 (or that
            cuSPARSELt rejects) as dense INT8 instead of failing.
        search: Let cuSPARSELt choose its fastest configuration per plan.
        epilogue: Sparse epilogue (:data:`~quantlab.runtimes.cusparselt.linear.EPILOGUE_MODES`; default: auto).

    Raises:
        ConversionError: unknown mode, or a layer that cannot run (without ``fallback``).
    """
    if mode not in MODES:
        raise ConversionError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    from quantlab.sparsity.pattern import is_2to4

    converted: Dict[str, str] = {}
    kept: Dict[str, str] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in linears:
        if not any(fnmatch.fnmatchcase(name, p) for p in include) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        try:
            params = int8_params(module, name)
        except ConversionError as exc:
            kept[name] = str(exc)
            continue
        runner: Optional[nn.Module] = None
        if mode == "sparse-int8":
            reason = None if is_2to4(params.weight, axis=1) else "weight is not 2:4 along its input dimension"
            if reason is None:
                try:
                    runner = SparseInt8Linear(params, search=search, lib=lib, epilogue=epilogue)
                    converted[name] = "sparse-int8"
                except QuantlabError as exc:
                    reason = str(exc)
            if runner is None:
                if not fallback:
                    raise ConversionError(f"layer '{name}' cannot run 2:4 sparse: {reason}")
                kept[name] = f"dense INT8: {reason}"
        if runner is None:
            runner = DenseInt8Linear(params)
            converted[name] = "int8"
        parent, child = _parent(model, name)
        setattr(parent, child, runner)
    return ConversionReport(converted, kept)


def prepare_plans(model: nn.Module, tokens: int) -> List[str]:
    """Creates (and searches) every sparse layer's plan for ``tokens`` rows; returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, SparseInt8Linear):
            module.prepare(tokens)
            names.append(name)
    return names


__all__ = ["ConversionError", "ConversionReport", "MODES", "convert_linears", "int8_params", "prepare_plans"]
