"""``input-shift``: centres each layer's non-negative input so symmetric INT8 covers it with the whole grid.

TensorRT's INT8 is symmetric (zero point 0). A ReLU/ReLU6 output lies in ``[0, m]``, so
its per-tensor scale ``m / 127`` leaves the negative half of the grid unused: the tensor
gets 7 bits. A layer computes the same thing from its input moved by a constant ``c``::

    W * x + b  ==  W * (x - c) + (b + c * sum(W))       (per output channel)

and with ``c = m / 2`` the moved input ``[-m/2, m/2]`` uses all 255 levels: one bit more
(the resolution asymmetric UINT8 gives, which TensorRT does not have). For each
Conv/Linear (any subclass) whose input never went below 0 on the calibration data this
transform stores ``c`` in an ``input_shift`` buffer, subtracts it from the input in a
forward pre-hook (before the input quantizer, which is attached later and so runs after
it), and adds ``c * sum(W)`` to the bias (a zero bias is created where there was none).
In the exported graph this is ``Sub -> Q -> DQ -> Conv``. The FP32 function is kept up to
float rounding, for any input.

Zero padding is one catch: padding ``x`` with 0 is padding ``x - c`` with ``-c``. A
convolution whose padding happens in a ``static_padding`` child (``nn.ZeroPad2d``, as
EfficientNet's ``Conv2dStaticSamePadding``) gets that child replaced by a constant pad of
``-c``; one that zero-pads inside the convolution (``padding > 0``, ``padding_mode
"zeros"``) is left as it is and reported. A shifted layer's input range is ``c`` whatever
the calibrator chose (:func:`input_range`, used when ranges are applied): the input's
zeros and the padding then sit exactly on the grid's -127.

INT8 weights are the other: the fold adds ``c * sum(W)`` with the float weights, the engine
computes ``c * sum(W_int8)``; the difference is one constant per output channel, which
bias correction (empirical, after AdaRound) estimates and removes. ``input-shift`` therefore
runs only with ``bias-correction`` (without it a small ReLU6 net's output error doubled
instead of halving).

Measured (EfficientNet-Lite1, every Conv/Linear INT8, 2 CPU cores, benchmarks/RESULTS.md):
with bn-fold, AdaRound and bias correction the logit KL fell from 0.0128 to 0.0110 and top-1
agreement stayed at ~90.5-90.8%; the same shift simulated exactly in fake quantization
reached 94.8%, so the fold does not yet deliver what the extra bit can.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, register_algorithm
from quantlab.registry import lookup_quantizable

NAME = "input-shift"
ORDER = 30  # after bn-fold (10), cle (20) and smoothquant (20): it moves the inputs they leave
SHIFT_BUFFER = "input_shift"
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _shift_input(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Forward pre-hook: the input moved by the module's ``input_shift`` (a module-level function, so
    deep copies and checkpoints carry no closure)."""
    return (args[0] - getattr(module, SHIFT_BUFFER).to(args[0].dtype),) + tuple(args[1:])


def _why_not(module: nn.Module) -> str:
    """Why ``module``'s input cannot be moved exactly ("" when it can)."""
    if not isinstance(module, _LAYERS):
        return f"{type(module).__name__} is not a Conv/Linear"
    if hasattr(module, SHIFT_BUFFER):
        return "already shifted"
    if isinstance(module, nn.Linear):
        return ""
    if module.padding_mode != "zeros":
        return ""  # reflect/replicate/circular padding of x - c is the padding of x, minus c
    padding = module.padding
    if isinstance(padding, str):
        padded = padding == "same" and any(k > 1 for k in module.kernel_size)
    else:
        padded = any(int(p) != 0 for p in padding)
    if padded:
        return "zero-pads its input inside the convolution (padding would have to become -shift)"
    static = getattr(module, "static_padding", None)
    if static is not None and not isinstance(static, nn.ZeroPad2d) and not _is_identity(static):
        return f"its static_padding is a {type(static).__name__} that changes its input"
    return ""


def _is_identity(module: nn.Module) -> bool:
    """Whether ``module`` hands a probe back unchanged (models bring their own Identity classes:
    EfficientNet's ``static_padding`` of a 1x1 conv is ``efficientnet_lite_pytorch.utils.Identity``)."""
    if isinstance(module, nn.Identity):
        return True
    probe = torch.arange(48, dtype=torch.float32).reshape(1, 3, 4, 4) - 20.0
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception:  # noqa: BLE001 - anything that cannot take the probe is not an identity
        return False
    return isinstance(out, torch.Tensor) and out.shape == probe.shape and bool(torch.equal(out, probe))


def _weight_sums(module: nn.Module) -> torch.Tensor:
    """``sum(W)`` per output channel: what a constant input of 1 adds to each output (groups included:
    each output channel sums only over its own group's inputs, all moved by the same constant)."""
    weight = module.weight.detach()
    return weight.reshape(weight.shape[0], -1).sum(dim=1)


def shift_layer(module: nn.Module, shift: float) -> None:
    """Moves ``module``'s input by ``shift`` keeping its function (see the module docstring)."""
    added = (_weight_sums(module).double() * shift).to(module.weight.dtype)
    add_shift_structure(module, shift)
    with torch.no_grad():
        module.bias.add_(added)


def add_shift_structure(module: nn.Module, shift: float) -> None:
    """Everything :func:`shift_layer` adds but the bias values: the ``input_shift`` buffer, the
    pre-hook, a zero bias where there was none, the constant pad (checkpoint loading calls this
    alone: the bias values come from the checkpoint)."""
    weight = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    module.register_buffer(SHIFT_BUFFER, torch.tensor(shift, dtype=weight.dtype, device=weight.device))
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.ZeroPad2d):
        module.static_padding = nn.ConstantPad2d(static.padding, -shift)
    module.register_forward_pre_hook(_shift_input)


def input_range(module: nn.Module, chosen: float) -> float:
    """The input amax a quantized layer gets: ``chosen`` (the calibrator's), or its shift where its
    input was moved. The moved input's zeros (ReLU's most common value, and the padding) sit at
    ``-shift``: only ``amax == shift`` puts them on the grid (-127) exactly; any other range
    rounds every one of them the same way, an error that adds up instead of averaging out."""
    shift = getattr(module, SHIFT_BUFFER, None)
    return float(shift) if isinstance(shift, torch.Tensor) else chosen


def measure_input_ranges(model: nn.Module, names: List[str], forward_loop: Any) -> Dict[str, Tuple[float, float]]:
    """``(min, max)`` of each named layer's input over the calibration data."""
    modules = dict(model.named_modules())
    lows: Dict[str, torch.Tensor] = {}
    highs: Dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: Tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
                low, high = x.detach().min().float(), x.detach().max().float()
                lows[name] = torch.minimum(lows[name], low) if name in lows else low
                highs[name] = torch.maximum(highs[name], high) if name in highs else high
        return record

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (float(lows[name]), float(highs[name])) for name in names if name in lows}


def rebuild_shifts(model: nn.Module, details: Mapping[str, Any]) -> None:
    """Redoes the structure of a recorded shift on the FP32 model (checkpoint loading): the buffers,
    hooks, created biases and constant pads; the bias values then come from the checkpoint.

    Raises:
        AlgorithmError: the record is malformed (it comes from a file) or names a layer the model lacks.
    """
    shifted = details.get("shifted") if isinstance(details, Mapping) else None
    if not isinstance(shifted, Mapping):
        raise AlgorithmError(f"{NAME}: the checkpoint's record has no 'shifted' table")
    modules = dict(model.named_modules())
    for name, shift in shifted.items():
        if not isinstance(name, str) or isinstance(shift, bool) or not isinstance(shift, (int, float)) \
                or not math.isfinite(shift) or shift <= 0:
            raise AlgorithmError(f"{NAME}: the checkpoint records a bad shift {shift!r} for {name!r}")
        module = modules.get(name)
        if module is None or not isinstance(module, _LAYERS):
            raise AlgorithmError(f"{NAME}: the checkpoint shifted the input of '{name}', which "
                                 f"{type(model).__name__} {'lacks' if module is None else 'has as a ' + type(module).__name__}")
        add_shift_structure(module, float(shift))


@register_algorithm(NAME, Stage.TRANSFORM, ORDER, needs_data=True, params={}, requires=("bias-correction",),
                    rebuild=rebuild_shifts,
                    description="move each Conv/Linear's non-negative input by half its range so symmetric INT8 "
                                "uses the whole grid (the shift folds into the bias; exact)")
def input_shift(model: nn.Module, context: AlgorithmContext) -> Dict[str, Any]:
    """Shifts every eligible layer's input in place; returns what it did."""
    if context.params:
        raise AlgorithmError(f"{NAME} takes no parameters, got {sorted(context.params)}")
    if context.forward_loop is None:
        raise AlgorithmError(f"{NAME} needs calibration data (a forward loop) to measure the input ranges")
    layers = {n: m for n, m in model.named_modules() if n and lookup_quantizable(m) is not None}
    skipped: Dict[str, str] = {}
    eligible = []
    for name, module in layers.items():
        why = _why_not(module)
        if why:
            skipped[name] = why
        else:
            eligible.append(name)
    ranges = measure_input_ranges(model, eligible, context.forward_loop)
    shifted: Dict[str, float] = {}
    for name in eligible:
        if name not in ranges:
            skipped[name] = "no calibration batch reached it"
            continue
        low, high = ranges[name]
        if not (math.isfinite(low) and math.isfinite(high)):
            raise AlgorithmError(f"{NAME}: the input of '{name}' is not finite on the calibration data "
                                 f"(min {low}, max {high})")
        if low < 0.0:
            skipped[name] = "its input goes below 0 (already uses both halves of the grid)"
            continue
        if high <= 0.0:
            skipped[name] = "its input is all zeros"
            continue
        shifted[name] = high / 2
        shift_layer(layers[name], high / 2)
    if not shifted:
        raise AlgorithmError(f"{NAME}: no layer of {type(model).__name__} has a non-negative input to shift "
                             f"({len(skipped)} layers: {sorted(set(skipped.values()))[:3]})")
    return {"shifted": shifted, "skipped": skipped, "layers": len(layers)}


__all__ = ["NAME", "add_shift_structure", "input_range", "input_shift", "measure_input_ranges", "rebuild_shifts", "shift_layer"]
