"""Empirical bias correction (Nagel et al. 2019, section 4.2; AIMET's empirical variant).

Quantization shifts the mean of a layer's outputs: with weight error ``eps = W~ - W``,
``E[W~ x] - E[W x] = eps E[x]`` per output channel, and clipped or rounded
activations upstream shift it further. Adding ``E[y_fp32] - E[y_quant]`` (per output
channel, over the calibration data) to the layer's bias removes that shift; a layer
without a bias gets one (where its forward reads ``self.bias``, so it exports as a plain
Conv/Gemm bias).

Two measures (parameter ``mode``):

* ``"empirical"`` (default): ``y_fp32`` from the FP32 model and ``y_quant`` from the
  quantized model with every earlier layer already quantized and corrected. Layers are
  corrected in the order the network runs them; each takes one calibration pass that
  stops right after that layer (about half a full pass on average), plus one FP32 pass
  for all the reference means. Corrects the shift from activation clipping too.
* ``"weights"``: one pass; each layer's FP32-weight and quantized-weight outputs of the
  same quantized input (the weight error alone, ``eps E[x~]``); all layers at once.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from quantlab.algorithms._layers import (
    QuantizedLayer,
    StopForward,
    call_stopping,
    can_add_bias,
    execution_order,
    first_input,
    fp32_reference,
    hooks,
    main_output,
    output_channel_dim,
    output_channels,
    quantized_layers,
    read_params,
    reference_of,
    run_pass,
)
from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, register_algorithm

NAME = "bias-correction"
DEFAULTS = {"mode": "empirical"}
MODES = ("empirical", "weights")


class _ChannelMeans:
    """Running per-output-channel means of a layer's outputs (float64 sums)."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def add(self, layer: QuantizedLayer, output: torch.Tensor) -> bool:
        """Adds one output; False if its channel dimension is unclear."""
        channels = output_channels(layer)
        dim = output_channel_dim(layer.module, output, channels)
        if dim is None:
            return False
        dims = [d for d in range(output.dim()) if d != dim]
        total = output.detach().float().sum(dim=dims).double()
        self.sums[layer.name] = self.sums[layer.name] + total if layer.name in self.sums else total
        self.counts[layer.name] = self.counts.get(layer.name, 0) + output.numel() // channels
        return True

    def mean(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.sums or not self.counts[name]:
            return None
        return self.sums[name] / self.counts[name]


def _add_to_bias(layer: QuantizedLayer, delta: torch.Tensor) -> bool:
    """Adds ``delta`` to the layer's bias (creating one); returns whether it was created."""
    module = layer.module
    bias = getattr(module, "bias", None)
    created = not isinstance(bias, torch.Tensor)
    with torch.no_grad():
        if created:
            module.bias = nn.Parameter(torch.zeros(delta.numel(), device=layer.weight.device, dtype=layer.weight.dtype))
            bias = module.bias
        bias.add_(delta.to(bias.device, bias.dtype).reshape(bias.shape))
    return created


def check_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """``mode`` checked, the default filled in.

    Raises:
        AlgorithmError: an unknown name or mode.
    """
    return read_params(NAME, params, DEFAULTS, {"mode": MODES})


@register_algorithm(NAME, Stage.REFINE, 20, needs_data=True, params=DEFAULTS, check=check_params,
                    description="empirical bias correction: adds E[y_fp32] - E[y_int8] per output channel to each bias")
def bias_correction(model: nn.Module, context: AlgorithmContext) -> Dict[str, Any]:
    """Corrects each quantized layer's bias from the calibration data (see the module doc).

    Params: ``mode``: ``"empirical"`` (default) or ``"weights"``.

    Returns:
        ``mode``, ``passes`` (calibration passes run), ``layers``: per corrected layer its
        name, the L2 norm and the largest magnitude of the correction, the norm of
        the bias before, and whether a bias was created; ``skipped``: layer -> why.
    """
    params = check_params(dict(context.params))
    layers = quantized_layers(model)
    reference = reference_of(model, layers, context)
    skipped: Dict[str, str] = {}
    eligible = []
    for layer in layers:
        if not isinstance(getattr(layer.module, "bias", None), torch.Tensor) and not can_add_bias(layer.module):
            skipped[layer.name] = f"no bias, and {type(layer.module).__name__}'s own forward might ignore a new one"
        else:
            eligible.append(layer)
    measure = _weight_error_means if params["mode"] == "weights" else _sequential
    reports, more_skipped, passes = measure(model, eligible, reference, context)
    skipped.update(more_skipped)
    return {"mode": params["mode"], "passes": passes, "corrected": len(reports), "layers": reports, "skipped": skipped}


def _correct(layer: QuantizedLayer, delta: torch.Tensor) -> Dict[str, Any]:
    """Adds ``delta`` to the layer's bias; returns what the report says about it."""
    if not bool(torch.isfinite(delta).all()):
        raise AlgorithmError(f"{NAME}: the outputs of layer '{layer.name}' hold NaN or Inf: no correction can be measured")
    old = getattr(layer.module, "bias", None)
    old_norm = float(old.detach().float().norm()) if isinstance(old, torch.Tensor) else 0.0
    created = _add_to_bias(layer, delta)
    return {"layer": layer.name, "correction_norm": float(delta.norm()), "correction_max_abs": float(delta.abs().max()),
            "bias_norm_before": old_norm, "bias_created": created, "channels": int(delta.numel())}


def _sequential(model: nn.Module, layers: List[QuantizedLayer], reference: Dict[str, torch.Tensor],
                context: AlgorithmContext) -> Tuple[List[Dict[str, Any]], Dict[str, str], int]:
    """E[y_fp32] - E[y_quant], layer after layer in network order, each applied before the next is measured."""
    fp32 = _ChannelMeans()
    unclear: Dict[str, str] = {}

    def on_fp32(layer: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
        out = main_output(output)
        if out is None or not fp32.add(layer, out):
            unclear[layer.name] = "its output has no clear channel dimension"

    with fp32_reference(model, layers, reference):
        order, skipped = execution_order(model, layers, context, on_output=on_fp32)
    skipped.update(unclear)
    order = [layer for layer in order if layer.name not in skipped]
    reports: List[Dict[str, Any]] = []
    passes = 1
    for layer in order:
        quantized = _ChannelMeans()

        def on_quant(hooked: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
            quantized.add(hooked, output)
            raise StopForward

        def step(run_model: Callable[[], Any]) -> None:
            call_stopping(run_model)

        with hooks([layer], on_quant):
            run_pass(model, context, step)
        passes += 1
        target, got = fp32.mean(layer.name), quantized.mean(layer.name)
        if target is None or got is None:
            skipped[layer.name] = "no output measured"
            continue
        reports.append(_correct(layer, (target - got).float()))
    return reports, skipped, passes


def _weight_error_means(model: nn.Module, layers: List[QuantizedLayer], reference: Dict[str, torch.Tensor],
                        context: AlgorithmContext) -> Tuple[List[Dict[str, Any]], Dict[str, str], int]:
    """One pass: per layer, E[f(x~, W_fp32) - f(x~, W~)] on the same quantized input x~."""
    means = _ChannelMeans()
    unclear: Dict[str, str] = {}

    def on_output(layer: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
        x, out = first_input(args), main_output(output)
        if x is None or out is None:
            unclear[layer.name] = "its input or output is not a single tensor"
            return
        with fp32_reference(model, [layer], reference, whole_model=False):  # this layer's FP32 weight
            fp32_out = layer.module.forward(*args)  # the hooks are not run again
        if not means.add(layer, fp32_out - out):
            unclear[layer.name] = "its output has no clear channel dimension"

    # The same pass gives the execution order and the layers to skip (never reached, shared weights).
    order, not_once = execution_order(model, layers, context, on_output=on_output)
    skipped = dict(unclear)
    skipped.update((layer.name, not_once[layer.name]) for layer in layers if layer.name in not_once)
    reports = []
    for layer in order:
        mean = means.mean(layer.name)
        if layer.name not in skipped and mean is not None:
            reports.append(_correct(layer, mean.float()))
    return reports, skipped, 1
