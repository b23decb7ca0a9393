"""Per-layer error of a quantized model: SQNR and cosine of each quantized layer's output.

One pass over a few batches, FP32 and INT8 copies side by side, with forward hooks:

* ``sqnr_db`` / ``cosine``: the layer's output in the INT8 model vs the same
  layer's output in the FP32 model, on the same batch. This is what a user sees
  end to end: the error of that tensor including everything accumulated upstream.
* ``local_sqnr_db`` / ``local_cosine``: the layer ALONE: while the FP32 model
  runs, each quantized layer of the INT8 copy is also called on the FP32 layer's
  own inputs, so the error is only that layer's (input + weight quantization).
  This isolates each layer's contribution, which is what ranks layers for
  sensitivity (the end-to-end error mostly grows with depth).

SQNR = 10 log10(sum x^2 / sum (x - q)^2) over all elements of all batches
(infinite if the outputs are identical); cosine is over the flattened outputs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from quantlab.attach import iter_quantizers, quantization_disabled
from quantlab.batching import call_model, model_device, split_batch, to_device
from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.tasks import first_tensor
from quantlab.tensor_quantizer import QuantizerMode


@dataclasses.dataclass
class LayerError:
    """Error of one quantized layer's output (see the module docstring)."""

    layer: str
    sqnr_db: float
    cosine: float
    local_sqnr_db: Optional[float] = None
    local_cosine: Optional[float] = None

    def to_row(self, calibrator: Optional[str]) -> Dict[str, Any]:
        """A row for :meth:`quantlab.store.RunStore.add_layer_stats`."""
        return {"calibrator": calibrator, "layer": self.layer, **{k: v for k, v in dataclasses.asdict(self).items() if k != "layer"}}


class _Accumulator:
    __slots__ = ("signal", "noise", "dot", "quant")

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quant = 0.0

    def add(self, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        x = reference.detach().double().reshape(-1)
        q = quantized.detach().double().reshape(-1)
        if x.shape != q.shape:
            raise EvaluationError(f"output shapes differ between the FP32 and INT8 model ({list(reference.shape)} vs {list(quantized.shape)})")
        self.signal += float(x.dot(x))
        self.noise += float((x - q).pow(2).sum())
        self.dot += float(x.dot(q))
        self.quant += float(q.dot(q))

    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def cosine(self) -> float:
        denominator = math.sqrt(self.signal * self.quant)
        return self.dot / denominator if denominator > 0 else (1.0 if self.noise == 0.0 else 0.0)


def quantized_layers(model: nn.Module) -> List[str]:
    """Names of the layers that quantize something right now (input or weight on), in module order."""
    names: List[str] = []
    for ref in iter_quantizers(model):
        if ref.quantizer.mode is QuantizerMode.QUANTIZE and ref.module_name not in names:
            names.append(ref.module_name)
    return names


def layer_errors(
    fp32_model: nn.Module,
    quant_model: nn.Module,
    batches: Sequence[Any],
    *,
    inputs_of: Callable[[Any], Any] = lambda batch: split_batch(batch)[0],
    local: bool = True,
    layers: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> List[LayerError]:
    """Measures every quantized layer's output error in one pass over ``batches``.

    Args:
        fp32_model: The floating-point model (its quantizers, if any, are switched off).
        quant_model: A quantized copy with the same module names (e.g. a deep copy
            after :func:`quantlab.quantize` and calibration).
        batches: A few eval batches.
        inputs_of: Batch -> model inputs (a task's ``inputs``).
        local: Also measure each layer alone on FP32 inputs (about one extra forward).
        layers: Restrict to these layer names (default: every quantizing layer).
        progress: Called with the number of batches done.

    Returns:
        One :class:`LayerError` per layer, in module order.

    Raises:
        EvaluationError: the models do not have the same layers, or no batch given.
    """
    if fp32_model is quant_model:
        raise EvaluationError("layer_errors needs two models: the FP32 model and a quantized copy")
    if not batches:
        raise EvaluationError("layer_errors needs at least one batch")
    names = list(layers) if layers is not None else quantized_layers(quant_model)
    fp32_modules = dict(fp32_model.named_modules())
    quant_modules = dict(quant_model.named_modules())
    missing = [n for n in names if n not in fp32_modules or n not in quant_modules]
    if missing:
        raise EvaluationError(f"layer(s) {', '.join(missing[:5])} are not in both models: pass the FP32 model and its quantized copy")
    end_to_end = {n: _Accumulator() for n in names}
    alone = {n: _Accumulator() for n in names}
    captured: Dict[str, List[torch.Tensor]] = {}

    def fp32_hook(name: str):
        def hook(module, args, kwargs, output):
            captured.setdefault(name, []).append(first_tensor(output).detach())
            if local:
                alone[name].add(first_tensor(output), first_tensor(quant_modules[name](*args, **kwargs)))
        return hook

    def quant_hook(name: str):
        def hook(module, args, output):
            pending = captured.get(name)
            if not pending:
                raise EvaluationError(f"layer '{name}' ran in the INT8 model but not in the FP32 model: the models differ")
            end_to_end[name].add(pending.pop(0), first_tensor(output))
        return hook

    device = model_device(fp32_model)
    fp32_was_training, quant_was_training = fp32_model.training, quant_model.training
    fp32_model.eval()
    quant_model.eval()
    try:
        with torch.no_grad(), quantization_disabled(fp32_model):
            for index, batch in enumerate(batches):
                inputs = inputs_of(to_device(batch, device))
                captured.clear()
                handles = [fp32_modules[n].register_forward_hook(fp32_hook(n), with_kwargs=True) for n in names]
                try:
                    call_model(fp32_model, inputs)
                finally:
                    for h in handles:
                        h.remove()
                handles = [quant_modules[n].register_forward_hook(quant_hook(n)) for n in names]
                try:
                    call_model(quant_model, inputs)
                finally:
                    for h in handles:
                        h.remove()
                captured.clear()  # free the FP32 activations before the next batch
                if progress is not None:
                    progress(index + 1)
    finally:
        fp32_model.train(fp32_was_training)
        quant_model.train(quant_was_training)
    return [
        LayerError(
            layer=n,
            sqnr_db=end_to_end[n].sqnr_db(),
            cosine=end_to_end[n].cosine(),
            local_sqnr_db=alone[n].sqnr_db() if local else None,
            local_cosine=alone[n].cosine() if local else None,
        )
        for n in names
    ]
