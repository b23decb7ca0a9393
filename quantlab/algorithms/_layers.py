"""What the refiners (bias correction, AdaRound) share: the quantized layers in the
order the network runs them, calibration passes that stop right after one layer, and
the FP32 reference model they compare with.

A refiner only gets ``forward_loop(model)``, which runs every calibration batch
through whatever module it is given. :func:`run_pass` hands it a thin wrapper
(:class:`_PassRunner`) whose forward runs the real model under the refiner's control:
once or twice per batch (FP32 reference, quantized), stopped by a forward hook as soon
as the layer of interest has run (the rest of the network is not computed), and the
whole loop ends early once enough samples are captured.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from quantlab.algorithms.base import AlgorithmContext, AlgorithmError
from quantlab.attach import iter_quantizers, original_weight, quantization_disabled
from quantlab.tensor_quantizer import QuantizerMode, Role, TensorQuantizer

# Layer types whose own forward reads ``self.bias``: a bias may be given to one that has none.
_BIAS_READERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclasses.dataclass
class QuantizedLayer:
    """A layer whose weight the model fake-quantizes now.

    Attributes:
        name: Module name in the model.
        module: The module.
        weight_quantizer: Its weight quantizer (in QUANTIZE mode).
        input_quantizer: Its input quantizer (any mode), if it has one.
    """

    name: str
    module: nn.Module
    weight_quantizer: TensorQuantizer
    input_quantizer: Optional[TensorQuantizer] = None

    @property
    def weight(self) -> torch.Tensor:
        """The float weight under the weight quantizer (a Parameter)."""
        return original_weight(self.module)


class StopForward(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the batch is skipped."""


class EnoughSamples(Exception):
    """Raised out of the forward loop once enough samples are captured."""


def quantized_layers(model: nn.Module) -> List[QuantizedLayer]:
    """Every layer whose weight is fake-quantized, in module order.

    Raises:
        AlgorithmError: the model has none (not quantized, or every layer kept in floating point).
    """
    inputs: Dict[str, TensorQuantizer] = {}
    layers: List[QuantizedLayer] = []
    for ref in iter_quantizers(model):
        if ref.role is Role.INPUT:
            inputs[ref.module_name] = ref.quantizer
        elif ref.quantizer.mode is QuantizerMode.QUANTIZE:
            layers.append(QuantizedLayer(ref.module_name, ref.module, ref.quantizer, inputs.get(ref.module_name)))
    if not layers:
        raise AlgorithmError("no layer of the model has a quantized weight: quantize it (with ranges applied) first")
    return layers


class _PassRunner(nn.Module):
    """What ``forward_loop`` is given: each call is one calibration batch, handed to ``step``."""

    def __init__(self, model: nn.Module, step: Callable[[Callable[[], Any]], None]) -> None:
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, *args: Any, **kwargs: Any) -> None:
        self.step(lambda: self.model(*args, **kwargs))


def run_pass(model: nn.Module, context: AlgorithmContext, step: Callable[[Callable[[], Any]], None]) -> None:
    """Runs the calibration batches; ``step(run_model)`` is called once per batch.

    ``run_model()`` runs the model on the batch (it may be called several times, in
    different modes; a :class:`StopForward` raised by a hook ends that call quietly).
    ``step`` may raise :class:`EnoughSamples` to end the loop. Gradients are off and
    the model is in eval mode (BatchNorm on its running statistics) during the pass.
    """
    if context.forward_loop is None:
        raise AlgorithmError("this algorithm needs calibration data (a forward loop)")
    runner = _PassRunner(model, step)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            context.forward_loop(runner)
    except EnoughSamples:
        pass
    finally:
        model.train(training)


def call_stopping(run_model: Callable[[], Any]) -> None:
    """Runs ``run_model()``; a :class:`StopForward` from a hook just ends it."""
    try:
        run_model()
    except StopForward:
        pass


@contextlib.contextmanager
def hooks(layers: Sequence[QuantizedLayer], hook: Callable[[QuantizedLayer, Tuple[Any, ...], Any], None]) -> Iterator[None]:
    """Forward hooks ``hook(layer, args, output)`` on ``layers`` (args: the input after its quantizer)."""
    handles = []
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(
                lambda module, args, output, layer=layer: hook(layer, args, output)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def pre_hooks_off(module: nn.Module) -> Iterator[None]:
    """Calls of ``module`` skip its forward pre-hooks: for inputs captured after them (``hooks``'s
    args), which must not pass them twice. The input quantizer's hook would do no harm twice (it is
    idempotent on its grid), but ``input-shift``'s would subtract its shift again."""
    saved = module._forward_pre_hooks
    module._forward_pre_hooks = type(saved)()
    try:
        yield
    finally:
        module._forward_pre_hooks = saved


@contextlib.contextmanager
def fp32_reference(model: nn.Module, layers: Sequence[QuantizedLayer],
                   reference: Optional[Mapping[str, torch.Tensor]], *, whole_model: bool = True) -> Iterator[nn.Module]:
    """Runs ``model`` as the FP32 model: every quantizer off and, where ``reference``
    (``refinable_state``) holds other float weights or biases than the layer has now
    (an earlier refiner changed them), those swapped in for the duration.

    Args:
        whole_model: Switch every quantizer of the model off; False: only those of ``layers``.
    """
    swapped: List[Tuple[nn.Module, str, Any]] = []
    try:
        for layer in layers if reference is not None else ():
            weight = reference.get(f"{layer.name}:weight")
            if weight is not None and weight is not layer.weight:
                swapped.append((layer.weight, "data", layer.weight.data))
                layer.weight.data = weight.to(layer.weight.device, layer.weight.dtype)
            bias = getattr(layer.module, "bias", None)
            if isinstance(bias, torch.Tensor):
                saved = reference.get(f"{layer.name}:bias")
                if saved is None:  # a bias that a refiner gave the layer: the FP32 model has none
                    swapped.append((layer.module, "_bias_param", bias))
                    layer.module._parameters["bias"] = None
                else:
                    swapped.append((bias, "data", bias.data))
                    bias.data = saved.to(bias.device, bias.dtype)
        if whole_model:
            with quantization_disabled(model):
                yield model
        else:
            with layers_in_float(layers):
                yield model
    finally:
        for owner, attr, value in reversed(swapped):
            if attr == "_bias_param":
                owner._parameters["bias"] = value
            else:
                owner.data = value


@contextlib.contextmanager
def layers_in_float(layers: Sequence[QuantizedLayer]) -> Iterator[None]:
    """The quantizers of ``layers`` off for the duration."""
    saved = [(q, q.mode) for layer in layers for q in (layer.weight_quantizer, layer.input_quantizer) if q is not None]
    try:
        for quantizer, _ in saved:
            quantizer.off()
        yield
    finally:
        for quantizer, mode in saved:
            quantizer.restore(mode)


def reference_of(model: nn.Module, layers: Sequence[QuantizedLayer], context: AlgorithmContext) -> Dict[str, torch.Tensor]:
    """The FP32 reference weights and biases: the context's, else the model's own now (copies)."""
    if context.reference_state is not None:
        return dict(context.reference_state)
    state: Dict[str, torch.Tensor] = {}
    for layer in layers:
        state[f"{layer.name}:weight"] = layer.weight.detach().clone()
        bias = getattr(layer.module, "bias", None)
        if isinstance(bias, torch.Tensor):
            state[f"{layer.name}:bias"] = bias.detach().clone()
    return state


def execution_order(model: nn.Module, layers: Sequence[QuantizedLayer], context: AlgorithmContext,
                    on_output: Optional[Callable[[QuantizedLayer, Tuple[Any, ...], Any], None]] = None,
                    max_samples: Optional[int] = None) -> Tuple[List[QuantizedLayer], Dict[str, str]]:
    """Runs the calibration batches once through ``model`` as it is now (the caller sets
    its mode) and returns the layers in the order they first ran, and those it must skip.

    Args:
        on_output: Also called for every layer call (e.g. to accumulate FP32 statistics).
        max_samples: Stop once the batches run held this many samples (counted at the
            first layer's input), for a caller that uses only the first ones.

    Returns:
        ``(ordered, skipped)``: layers that ran exactly once per batch, in order; and
        layer name -> why it is skipped (never ran, or ran more than once per batch:
        shared weights, whose inputs mix several uses).
    """
    first_seen: Dict[str, int] = {}
    calls: Dict[str, int] = {}
    batches = [0]
    samples = [0, -1]  # samples so far, the batch last counted

    def hook(layer: QuantizedLayer, args: Tuple[Any, ...], output: Any) -> None:
        x = first_input(args)
        if samples[1] != batches[0] and x is not None:
            samples[0] += x.shape[0] if x.dim() else 1
            samples[1] = batches[0]
        first_seen.setdefault(layer.name, len(first_seen))
        calls[layer.name] = calls.get(layer.name, 0) + 1
        if on_output is not None:
            on_output(layer, args, output)

    def step(run_model: Callable[[], Any]) -> None:
        if max_samples is not None and samples[0] >= max_samples:
            raise EnoughSamples
        batches[0] += 1
        run_model()

    with hooks(layers, hook):
        run_pass(model, context, step)
    if batches[0] == 0:
        raise AlgorithmError("calibration data is empty: no batch reached the model")
    skipped: Dict[str, str] = {}
    ordered = []
    for layer in sorted((l for l in layers if l.name in first_seen), key=lambda l: first_seen[l.name]):
        if calls[layer.name] != batches[0]:
            skipped[layer.name] = f"runs {calls[layer.name]} times in {batches[0]} batches (shared weights)"
        else:
            ordered.append(layer)
    for layer in layers:
        if layer.name not in first_seen:
            skipped[layer.name] = "no calibration batch reached it"
    return ordered, skipped


def output_channel_dim(module: nn.Module, output: torch.Tensor, channels: int) -> Optional[int]:
    """The dimension of ``output`` that holds the layer's output channels, or None if unclear.

    Convolutions: dim 1 (N, C, ...). Linear (and other layers): the last dim.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1 if output.dim() >= 2 and output.shape[1] == channels else None
    return output.dim() - 1 if output.dim() >= 1 and output.shape[-1] == channels else None


def output_channels(layer: QuantizedLayer) -> int:
    """How many output channels the layer has (from its bias, else its weight)."""
    bias = getattr(layer.module, "bias", None)
    if isinstance(bias, torch.Tensor):
        return bias.numel()
    weight = layer.weight
    if isinstance(layer.module, nn.modules.conv._ConvTransposeNd):
        return weight.shape[1] * layer.module.groups
    return weight.shape[0]


def can_add_bias(module: nn.Module) -> bool:
    """Whether a bias can be given to a layer that has none: its forward is torch's own,
    which reads ``self.bias`` (a subclass with its own forward might ignore it)."""
    for base in _BIAS_READERS:
        if isinstance(module, base):
            return type(module).forward is base.forward
    return False


def first_input(args: Tuple[Any, ...]) -> Optional[torch.Tensor]:
    """The layer's (quantized) input tensor from a forward hook's args."""
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def main_output(output: Any) -> Optional[torch.Tensor]:
    return output if isinstance(output, torch.Tensor) else None


def read_params(algorithm: str, params: Mapping[str, Any], defaults: Mapping[str, Any],
                choices: Optional[Mapping[str, Sequence[str]]] = None) -> Dict[str, Any]:
    """The algorithm's parameters with defaults filled in, each checked.

    Numbers must be finite and > 0 (ints for int defaults), strings one of ``choices``.

    Raises:
        AlgorithmError: an unknown name or a bad value (naming the known ones).
    """
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise AlgorithmError(f"{algorithm}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(defaults))}")
    out = dict(defaults)
    for key, value in params.items():
        default = defaults[key]
        if isinstance(default, str):
            allowed = (choices or {}).get(key, ())
            if not isinstance(value, str) or (allowed and value not in allowed):
                raise AlgorithmError(f"{algorithm}: {key} must be one of {', '.join(allowed)}, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise AlgorithmError(f"{algorithm}: {key} must be true or false, got {value!r}")
        else:
            number = value
            if isinstance(value, str):
                try:
                    number = int(value) if isinstance(default, int) else float(value)
                except ValueError:
                    number = None
            ok = isinstance(number, (int, float)) and not isinstance(number, bool) and number == number \
                and abs(number) != float("inf") and number > 0
            if ok and isinstance(default, int) and float(number) != int(number):
                ok = False
            if not ok:
                kind = "a positive integer" if isinstance(default, int) else "a positive number"
                raise AlgorithmError(f"{algorithm}: {key} must be {kind}, got {value!r}")
            value = int(number) if isinstance(default, int) else float(number)
        out[key] = value
    return out
