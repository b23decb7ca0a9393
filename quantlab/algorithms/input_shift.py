"""``input-shift``: centres each layer's non-negative input so symmetric INT8 covers it with the whole grid.

TensorRT's INT8 is symmetric (zero point 0). A ReLU/ReLU6 output lies in ``[0, m]``, so
its per-tensor scale ``m / 127`` leaves the negative half of the grid unused: the tensor
gets 7 bits. A layer computes the same thing from its input moved by a constant ``c``::

    W x + b  ==  W (x - c) + (b + c * sum(W))       (per output channel)

and with ``c = m / 2`` the moved input ``[-m/2, m/2]`` uses all 255 levels: one bit more
(the resolution asymmetric UINT8 gives, which TensorRT does not have). For each
Conv/Linear (any subclass) whose input never went below 0 on the calibration data this
transform stores ``c`` in an ``input_shift`` buffer, subtracts it from the input in a
forward pre-hook (before the input quantizer, which is attached later and so runs after
it), and adds ``c * sum(W)`` to the output in a forward hook, with ``W`` the weight the
layer computes with: the float weight in FP32, the INT8 weight once quantized. In the
exported graph ``c * sum(W_int8)`` is a constant folded into the bias
(:func:`shifts_in_bias`): ``Sub -> Q -> DQ -> Conv``.

Why the weight the layer computes with, not the float one: folded with float ``W`` the
INT8 layer's error is ``(W_int8 - W)(x - c)``, and ``x - c`` is far from 0 on most of a
ReLU6 output (its mass sits at 0, i.e. at ``-c``). That constant term dominated AdaRound's
reconstruction loss (EfficientNet-Lite1: 8-10x the loss of the form below by the last layers)
and cost the extra bit its gain (90.5% top-1 agreement, as without the shift). With
``sum(W_int8)`` the error is ``(W_int8 - W) x``, as without the shift, plus the finer
input grid; AdaRound's rounding moves the constant with it. The model keeps the FP32
function up to float rounding, for any input, and its bias parameter stays the
unshifted one (checkpoints store it so).

Zero padding is the catch: padding ``x`` with 0 is padding ``x - c`` with ``-c``. A
convolution whose padding happens in a ``static_padding`` child (``nn.ZeroPad2d``, as
EfficientNet's ``Conv2dStaticSamePadding``) gets that child replaced by a constant pad of
``-c``; one that zero-pads inside the convolution (``padding > 0``, ``padding_mode
"zeros"``) is left as it is and reported. A shifted layer's input range is ``c`` whatever
the calibrator chose (:func:`input_range`, used when ranges are applied): the input's
zeros and the padding then sit exactly on the grid's -127.

The legacy path for TensorRT <= 10 (a float ONNX plus a calibration cache; TensorRT rounds
the weights itself) exports ``c * sum(W)`` with the float weights: there the layer's error
is the ``(W_int8 - W)(x - c)`` above. The Q/DQ export carries the INT8 weights' sum.

Measured (EfficientNet-Lite1, every Conv/Linear INT8, H200, benchmarks/RESULTS.md): with
bn-fold, AdaRound and bias correction, top-1 agreement with FP32 94.2% (max) / 93.6% (mse)
against 91.4% / 90.9% without the shift.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, register_algorithm
from quantlab.registry import lookup_quantizable

NAME = "input-shift"
ORDER = 30  # after bn-fold (10), cle (20) and smoothquant (20): it moves the inputs they leave
SHIFT_BUFFER = "input_shift"
_IN_BIAS = "_input_shift_in_bias"  # set while shifts_in_bias holds c * sum(W) in the bias
# How a checkpoint's bias relates to the shift: "unshifted" (the hook adds c * sum(W) at run time).
# Records without it come from the version that folded c * sum(W_float) into the stored bias.
BIAS_FORM = "unshifted"
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _shift_input(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Forward pre-hook: the input moved by the module's ``input_shift`` (a module-level function, so
    deep copies and checkpoints carry no closure)."""
    return (args[0] - getattr(module, SHIFT_BUFFER).to(args[0].dtype),) + tuple(args[1:])


def _add_weight_sums(module: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> Optional[torch.Tensor]:
    """Forward hook: ``c * sum(W)`` added per output channel, ``W`` the weight the layer computes
    with now (``module.weight``: fake-quantized once quantized, AdaRound's soft weight while it
    learns); nothing while :func:`shifts_in_bias` holds it in the bias."""
    if getattr(module, _IN_BIAS, False):
        return None
    added = _weight_sums(module.weight) * getattr(module, SHIFT_BUFFER).to(output.dtype)
    return output + added.to(output.dtype).reshape(_channel_shape(module))


def _channel_shape(module: nn.Module) -> Tuple[int, ...]:
    """The shape that broadcasts one value per output channel over the layer's output (Conv: the
    dim before the spatial ones, batched or not; Linear: the last)."""
    if isinstance(module, nn.Linear):
        return (-1,)
    spatial = len(module.kernel_size)
    return (-1,) + (1,) * spatial


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


def _weight_sums(weight: torch.Tensor) -> torch.Tensor:
    """``sum(W)`` per output channel: what a constant input of 1 adds to each output (groups included:
    each output channel sums only over its own group's inputs, all moved by the same constant)."""
    return weight.reshape(weight.shape[0], -1).sum(dim=1)


def shift_layer(module: nn.Module, shift: float) -> None:
    """Moves ``module``'s input by ``shift`` keeping its function (see the module docstring): the
    ``input_shift`` buffer, the two hooks, a zero bias where there was none (the export folds
    ``c * sum(W)`` into it), the constant pad. Checkpoint loading calls this too: the bias
    parameter is the unshifted one either way."""
    weight = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    module.register_buffer(SHIFT_BUFFER, torch.tensor(shift, dtype=weight.dtype, device=weight.device))
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.ZeroPad2d):
        module.static_padding = nn.ConstantPad2d(static.padding, -shift)
    module.register_forward_pre_hook(_shift_input)
    module.register_forward_hook(_add_weight_sums)


@contextlib.contextmanager
def shifts_in_bias(model: nn.Module) -> Iterator[nn.Module]:
    """Each shifted layer's ``c * sum(W)`` (``W`` as it computes now: INT8 where its weight is
    quantized) added to its bias and its output hook idle, for the duration: the form an exported
    graph needs (one constant bias, no weight reduction at run time). The bias is put back after."""
    saved: List[Tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                shift = getattr(module, SHIFT_BUFFER, None)
                if not isinstance(shift, torch.Tensor) or getattr(module, _IN_BIAS, False):
                    continue
                sums = _weight_sums(module.weight.detach()).double() * float(shift)
                saved.append((module, module.bias.detach().clone()))
                module.bias.add_(sums.to(module.bias.dtype))
                setattr(module, _IN_BIAS, True)
        yield model
    finally:
        with torch.no_grad():
            for module, bias in saved:
                module.bias.copy_(bias)
                setattr(module, _IN_BIAS, False)


def input_range(module: nn.Module, chosen: float) -> float:
    """The input amax a quantized layer gets: ``chosen`` (the calibrator's), or its shift where its
    input was moved. The moved input's zeros (ReLU's most common value, and the padding) sit at
    ``-shift``: only ``amax == shift`` puts them on the grid (-127) exactly; any other range
    rounds every one of them the same way, an error that adds up instead of averaging out."""
    # The buffer dict itself: getattr on a module without the buffer raises inside nn.Module (slow,
    # and this runs once per input quantizer per calibrator).
    shift = module.__dict__.get("_buffers", {}).get(SHIFT_BUFFER)
    return float(shift) if isinstance(shift, torch.Tensor) else chosen


def measure_input_ranges(model: nn.Module, names: List[str], forward_loop: Any,
                         probes: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Tuple[float, float]]:
    """``(min, max)`` of each named layer's input over the calibration data; with ``probes``, also
    the first two samples of each layer's first input (for :func:`_keeps_function`)."""
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
                if probes is not None and name not in probes and len(args) == 1:
                    probes[name] = x.detach()[:2].clone()
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


def _keeps_function(module: nn.Module, shift: float, probe: Optional[torch.Tensor]) -> str:
    """"" if a shifted copy of ``module`` gives its outputs on ``probe`` (calibration inputs), else why
    not: the output hook assumes the layer returns ``W x + b`` of its input, which a subclass's own
    ``forward`` need not (an activation after the convolution, a second input)."""
    if probe is None:
        return "its input could not be probed (not a single tensor)"
    trial = copy.deepcopy(module)
    shift_layer(trial, shift)
    with torch.no_grad():
        want, got = module(probe), trial(probe)
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return f"{type(module).__name__}'s output is not one tensor"
    error = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max()) + shift * float(_weight_sums(module.weight.detach()).double().abs().max())
    if not error <= 1e-4 * max(1.0, scale):
        return (f"shifting its input changed {type(module).__name__}'s output by up to {error:.3g} on calibration "
                "data: its forward is not W x + b of its input")
    return ""


def rebuild_shifts(model: nn.Module, details: Mapping[str, Any]) -> None:
    """Redoes the structure of a recorded shift on the FP32 model (checkpoint loading): the buffers,
    hooks, created biases and constant pads; the bias values then come from the checkpoint.

    Raises:
        AlgorithmError: the record is malformed (it comes from a file) or names a layer the model lacks.
    """
    shifted = details.get("shifted") if isinstance(details, Mapping) else None
    if not isinstance(shifted, Mapping):
        raise AlgorithmError(f"{NAME}: the checkpoint's record has no 'shifted' table")
    if details.get("bias") != BIAS_FORM:
        raise AlgorithmError(f"{NAME}: the checkpoint was written by an earlier quantlab that folded the shift into "
                             "the stored bias with the float weights; run PTQ again to get a checkpoint this version reads")
    modules = dict(model.named_modules())
    for name, shift in shifted.items():
        if not isinstance(name, str) or isinstance(shift, bool) or not isinstance(shift, (int, float)) \
                or not math.isfinite(shift) or shift <= 0:
            raise AlgorithmError(f"{NAME}: the checkpoint records a bad shift {shift!r} for {name!r}")
        module = modules.get(name)
        if module is None or not isinstance(module, _LAYERS):
            raise AlgorithmError(f"{NAME}: the checkpoint shifted the input of '{name}', which "
                                 f"{type(model).__name__} {'lacks' if module is None else 'has as a ' + type(module).__name__}")
        shift_layer(module, float(shift))


@register_algorithm(NAME, Stage.TRANSFORM, ORDER, needs_data=True, params={},
                    rebuild=rebuild_shifts,
                    description="move each Conv/Linear's non-negative input by half its range so symmetric INT8 "
                                "uses the whole grid (shift * sum(W_int8) goes into the exported bias; FP32 function kept)")
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
    probes: Dict[str, torch.Tensor] = {}
    ranges = measure_input_ranges(model, eligible, context.forward_loop, probes)
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
        why = _keeps_function(layers[name], high / 2, probes.get(name))
        if why:
            skipped[name] = why
            continue
        shifted[name] = high / 2
        shift_layer(layers[name], high / 2)
    if not shifted:
        raise AlgorithmError(f"{NAME}: no layer of {type(model).__name__} has a non-negative input to shift "
                             f"({len(skipped)} layers: {sorted(set(skipped.values()))[:3]})")
    return {"shifted": shifted, "skipped": skipped, "layers": len(layers), "bias": BIAS_FORM}


__all__ = ["BIAS_FORM", "NAME", "input_range", "input_shift", "measure_input_ranges", "rebuild_shifts", "shift_layer", "shifts_in_bias"]
