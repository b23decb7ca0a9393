"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Rounding every weight to the nearest grid point is not the best rounding for the
layer's output. AdaRound learns, per weight, whether to round down or up, by
reconstructing each layer's FP32 output on calibration data:

* ``W~ = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1,
  ``V`` started where ``h(V)`` is the fractional part (round-to-nearest start);
  ``s`` is the weight quantizer's scale for the range it holds (fixed).
* Loss ``|| f(x~, W~) - y ||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)``: ``x~`` is the
  layer's input in the quantized model (earlier layers quantized and already
  rounded, so their error is compensated), ``y`` the layer's output in the FP32
  model; beta anneals from 20 to 2 (cosine) after a warm start without the
  regularizer, which then drives every ``h(V)`` to 0 or 1. Adam on ``V``.
* Layers go in network order; each caches its inputs and targets (at most
  ``max_samples`` samples, on the model's device) from calibration passes that stop
  right after the layer, then trains on random mini-batches of that cache. The FP32
  targets of several consecutive layers come from one pass (up to ``target_cache_mb``;
  see ``_adaround_data``); on CUDA each iteration is replayed as one CUDA graph
  (``cuda_graphs``; see ``_adaround_loop``): the same computation, without the host.

At the end the rounded weights, exact grid values ``s * code``, are written into the
float weight: the weight quantizer (same range) rounds them to themselves, so
fake quantization, scales files and the Q/DQ export carry the learned codes. The
weights at the edge of the grid (``|round(W / s)| = 127``, which define the range)
keep their nearest rounding and their float value, so the range measured again from
the weights is unchanged. A layer whose learned rounding reconstructs worse than
round-to-nearest on its cached data keeps round-to-nearest (reported).
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from quantlab.algorithms._adaround_data import LayerData, output_bytes
from quantlab.algorithms._adaround_loop import NonFinite, batch_indices, optimize
from quantlab.algorithms._layers import (
    QuantizedLayer,
    execution_order,
    fp32_reference,
    layers_in_float,
    output_channel_dim,
    output_channels,
    pre_hooks_off,
    quantized_layers,
    read_params,
    reference_of,
)
from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, register_algorithm
from quantlab.attach import weight_name
from quantlab.functional import scale_from_amax

NAME = "adaround"
ZETA, GAMMA = 1.1, -0.1
MAX_ITERATIONS = 100_000  # the paper's runs take 10k-20k per layer
DEFAULTS: Dict[str, Any] = {
    "iterations": 300,  # per layer (the paper: 10k at lr 1e-3; fewer, larger steps here)
    "lr": 1e-2,
    "reg_weight": 0.01,  # lambda
    "batch_size": 32,  # samples per step
    "max_samples": 256,  # cached calibration samples per layer
    "warm_start": 0.2,  # fraction of iterations without the rounding regularizer
    "beta_start": 20.0,
    "beta_end": 2.0,
    "target_cache_mb": 1024,  # FP32 layer outputs cached ahead of their layer (one FP32 pass for several layers)
    "cuda_graphs": True,  # on CUDA, replay each optimization iteration as one CUDA graph (else eager)
}


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V)``: sigmoid stretched to (gamma, zeta) and clipped to [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def beta_at(iteration: int, params: Dict[str, Any]) -> Optional[float]:
    """The regularizer's beta at an iteration (None during the warm start: no regularizer)."""
    total = params["iterations"]
    warm = int(params["warm_start"] * total)
    if iteration < warm:
        return None
    progress = (iteration - warm) / max(1, total - warm)
    return params["beta_end"] + 0.5 * (params["beta_start"] - params["beta_end"]) * (1 + math.cos(progress * math.pi))


class LayerRounding(nn.Module):
    """The learnable rounding of one layer's weight on its quantizer's grid.

    Args:
        weight: The FP32 weight.
        scale: The quantizer's scale (0-d, or one per channel along ``axis``).
        axis: The channel axis of a per-channel scale.
        quant_min, quant_max: The integer grid.
        bound: Largest magnitude on the grid (127): weights that round to it stay fixed.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, axis: Optional[int], quant_min: int, quant_max: int,
                 bound: int) -> None:
        super().__init__()
        w = weight.detach().float()
        shape = [1] * w.dim()
        if axis is not None and scale.dim() > 0:
            shape[axis] = -1
        self.register_buffer("scale", scale.detach().float().reshape(shape) if scale.dim() > 0 else scale.detach().float())
        self.register_buffer("weight", w)
        scaled = w * torch.reciprocal(self.scale)  # the quantizer's own arithmetic: x * (1 / s)
        self.register_buffer("floor", torch.floor(scaled))
        self.register_buffer("nearest", torch.round(scaled).clamp(quant_min, quant_max))
        self.register_buffer("fixed", self.nearest.abs() >= bound)
        # The free weights' flat positions, found once: selecting them by a boolean mask in every
        # iteration would make the device report their number to the host (a sync, and no CUDA graph).
        self.register_buffer("free_index", torch.nonzero(~self.fixed.flatten()).flatten())
        self.quant_min, self.quant_max = quant_min, quant_max
        rest = ((scaled - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.log(rest) - torch.log1p(-rest))

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def codes(self, hard: bool) -> torch.Tensor:
        """Integer codes (as floats): ``floor + h(V)`` (soft) or ``floor + [h(V) >= 0.5]`` (hard)."""
        up = (self.v >= 0).to(self.floor.dtype) if hard else self.h()
        return torch.where(self.fixed, self.nearest, (self.floor + up).clamp(self.quant_min, self.quant_max))

    def soft_weight(self) -> torch.Tensor:
        return self.codes(hard=False) * self.scale

    def hard_weight(self) -> torch.Tensor:
        """The rounded weight: grid values, and the fixed (range-defining) weights as they were."""
        return torch.where(self.fixed, self.weight, self.codes(hard=True) * self.scale)

    def nearest_weight(self) -> torch.Tensor:
        return torch.where(self.fixed, self.weight, self.nearest * self.scale)

    def regularizer(self, beta: Union[float, torch.Tensor]) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)`` over the free weights (beta: a number or a 0-d tensor)."""
        return (1 - (2 * self.h().flatten().index_select(0, self.free_index) - 1).abs().pow(beta)).sum()


class ChannelSquaredError(torch.autograd.Function):
    """``((out - y) ** 2).sum(dim).mean()``, its value and gradient bit for bit, with one
    full-size temporary kept and a one-pass backward.

    The plain expression keeps the difference and its square and takes three full-size
    passes backward; on a CPU, allocating those activation-sized tensors every iteration
    (page faults) costs as much as the arithmetic.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
        diff = out - y
        ctx.save_for_backward(diff)
        ctx.rest = diff.numel() // diff.shape[dim]  # the elements the mean is over
        return (diff * diff).sum(dim).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        (diff,) = ctx.saved_tensors
        # mean -> sum -> pow(2) backward: (grad / rest) * 2 * diff, the same products in place.
        return diff.mul_(2 * (grad / ctx.rest)), None, None


def check_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters with defaults filled in, each checked (see :func:`adaround`).

    Raises:
        AlgorithmError: an unknown name or a bad value.
    """
    params = read_params(NAME, params, DEFAULTS)
    if not params["warm_start"] < 1:
        raise AlgorithmError(f"{NAME}: warm_start must be below 1, got {params['warm_start']}")
    if params["iterations"] > MAX_ITERATIONS:  # the mini-batch indices of all iterations are drawn up front
        raise AlgorithmError(f"{NAME}: iterations must be at most {MAX_ITERATIONS} per layer, got {params['iterations']}")
    return params


@register_algorithm(NAME, Stage.REFINE, 10, needs_data=True, params=DEFAULTS, check=check_params,
                    description="AdaRound: learns up/down rounding of each weight by layer-wise output reconstruction")
def adaround(model: nn.Module, context: AlgorithmContext) -> Dict[str, Any]:
    """Learns the rounding of every quantized layer's weight (see the module doc).

    Params: ``iterations`` (per layer), ``lr``, ``reg_weight`` (lambda), ``batch_size``,
    ``max_samples`` (cached per layer), ``warm_start``, ``beta_start``, ``beta_end``,
    ``target_cache_mb`` (FP32 targets cached ahead), ``cuda_graphs`` (replay the iterations on CUDA).

    Returns:
        Per layer: reconstruction loss (mean over the cached samples) with nearest
        rounding and with the learned rounding, the share of weights rounded the
        other way than nearest, which rounding was kept, how the optimization ran
        (``optimizer``: cuda-graph or eager), samples and seconds (capture, optimize,
        total); the layers skipped and why; the calibration passes run.

    Raises:
        AlgorithmError: bad parameters, no quantized layer, NaN or Inf during a
            layer's reconstruction (naming the layer; the weights are left as they were).
    """
    params = check_params(dict(context.params))
    layers = quantized_layers(model)
    reference = reference_of(model, layers, context)
    sample_bytes: Dict[str, int] = {}

    def record_size(layer: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
        sample_bytes[layer.name] = max(sample_bytes.get(layer.name, 0), output_bytes(output))

    with fp32_reference(model, layers, reference):
        order, skipped = execution_order(model, layers, context, on_output=record_size, max_samples=params["max_samples"])
    data = LayerData(model, layers, order, reference, context, params["max_samples"], sample_bytes,
                     params["target_cache_mb"] << 20, NAME)
    reports: List[Dict[str, Any]] = []
    written: List[Tuple[QuantizedLayer, torch.Tensor]] = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    try:
        for layer in order:
            start = time.perf_counter()
            inputs, targets = data.take(layer)
            if inputs is None:
                skipped[layer.name] = "its input or output is not a single tensor"
                continue
            captured = time.perf_counter()
            with pre_hooks_off(layer.module):  # the inputs were captured after the layer's pre-hooks
                report, weight = _reconstruct(layer, inputs, targets, params, generator)
            del inputs, targets
            if weight is not None:
                with torch.no_grad():
                    saved = layer.weight.detach().clone()
                    layer.weight.copy_(weight.to(layer.weight.dtype))
                written.append((layer, saved))
            end = time.perf_counter()
            report.update(seconds=end - start, capture_seconds=captured - start, optimize_seconds=end - captured)
            reports.append(report)
    except BaseException:
        with torch.no_grad():  # leave the model as it was
            for layer, saved in written:
                layer.weight.copy_(saved)
        raise
    return {"layers": reports, "rounded": len(reports), "skipped": skipped,
            "passes": {"fp32": data.fp32_passes, "quantized": data.quantized_passes,
                       "fp32_outputs_cached_ahead": not data.paired_only},
            "params": {k: params[k] for k in sorted(params)}}


def _reconstruct(layer: QuantizedLayer, inputs: torch.Tensor, targets: torch.Tensor, params: Dict[str, Any],
                 generator: torch.Generator) -> Tuple[Dict[str, Any], Optional[torch.Tensor]]:
    """Trains the layer's rounding; returns its report and the weight to write (None: keep nearest)."""
    quantizer = layer.weight_quantizer
    spec = quantizer.spec
    rounding = LayerRounding(layer.weight, scale_from_amax(quantizer.amax, spec), spec.axis, spec.quant_min,
                             spec.quant_max, spec.bound).to(layer.weight.device)
    key = f"parametrizations.{weight_name(layer.module)}.original"
    channels = output_channels(layer)
    channel_dim = output_channel_dim(layer.module, targets, channels)

    # The layer's other parameters (its bias) enter detached: autograd then computes no gradient
    # for them (a reduction over the whole output per iteration) and leaves no .grad on the model.
    frozen = {name: p.detach() for name, p in layer.module.named_parameters() if name != key}

    def loss_of(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(layer.module, {**frozen, key: weight.to(layer.weight.dtype)}, (x,))
        # Sum over output channels, mean over the rest (AdaRound's ||.||_F^2 per sample position).
        if channel_dim is not None:
            return ChannelSquaredError.apply(out.float(), y, channel_dim)
        return (out.float() - y).pow(2).mean() * channels

    samples = inputs.shape[0]
    # Float64 sums on the device, read back once (the former per-batch float() read-backs, same sums).
    total_dtype = torch.float32 if inputs.device.type == "mps" else torch.float64

    def full_loss(weight: torch.Tensor) -> float:
        total = torch.zeros((), dtype=total_dtype, device=inputs.device)
        with torch.no_grad():
            for i in range(0, samples, params["batch_size"]):
                x, y = inputs[i:i + params["batch_size"]], targets[i:i + params["batch_size"]]
                total += loss_of(weight, x, y).to(total_dtype) * x.shape[0]
        return float(total) / samples

    def fail(where: str) -> AlgorithmError:
        return AlgorithmError(f"{NAME}: NaN or Inf in the reconstruction of layer '{layer.name}' ({where}); "
                              "its weights are left as they were")

    with layers_in_float([layer]):  # the cached input is already quantized; the weight is given
        before = full_loss(rounding.nearest_weight())
        if not math.isfinite(before):
            raise fail("with round-to-nearest")
        iterations = params["iterations"]
        index = batch_indices(samples, min(params["batch_size"], samples), iterations, generator, inputs.device)
        try:
            outcome = optimize(rounding, loss_of, inputs, targets, index, [beta_at(i, params) for i in range(iterations)],
                               params["reg_weight"], params["lr"], cuda_graph=params["cuda_graphs"])
        except NonFinite as error:
            raise fail(f"iteration {error.iteration}") from None
        with torch.no_grad():
            hard = rounding.hard_weight()
            after = full_loss(hard)
            if not math.isfinite(after):
                raise fail("with the learned rounding")
            free = ~rounding.fixed
            flipped = (rounding.codes(hard=True) != rounding.nearest)[free]
            undecided = ((rounding.h() > 0.01) & (rounding.h() < 0.99))[free]
    keep = after <= before
    report = {
        "layer": layer.name,
        "samples": samples,
        "loss_nearest": before,
        "loss_adaround": after,
        "soft_loss_first": outcome.first_loss,
        "soft_loss_last": outcome.last_loss,
        "flipped_fraction": float(flipped.float().mean()) if flipped.numel() else 0.0,
        "undecided_fraction": float(undecided.float().mean()) if undecided.numel() else 0.0,
        "kept": "adaround" if keep else "nearest",
        "optimizer": outcome.mode,
    }
    return report, hard if keep else None
