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

``row_sqnr_db`` / ``local_row_sqnr_db`` average the SQNR of each ROW instead:
a row is one token's feature vector for ``[batch, (tokens,) features]`` outputs
(Linear) and one sample for ``[batch, channels, ...]`` outputs (convolutions);
each row's SQNR is capped at 100 dB. The global SQNR is dominated by the
largest values: when a few tokens carry huge activations (LLM "massive
activations", e.g. 3,000 vs ~1 entering a down projection), a per-tensor INT8
range set by them rounds every other token to zero, yet the global SQNR still
looks healthy (35 dB on SmolLM2's layer 11 down_proj) because the outlier
tokens are kept. The mean per-row SQNR shows it (0.3 dB there), so it is the
sensitivity proxy.
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


#: The per-layer SQNR fields, most preferred sensitivity proxy first; readers of stored rows
#: (reports, dashboard) fall back along the same order when a field was not measured.
PROXY_FIELDS = ("local_row_sqnr_db", "local_sqnr_db", "row_sqnr_db", "sqnr_db")


@dataclasses.dataclass
class LayerError:
    """Error of one quantized layer's output (see the module docstring)."""

    layer: str
    sqnr_db: float
    cosine: float
    local_sqnr_db: Optional[float] = None
    local_cosine: Optional[float] = None
    row_sqnr_db: Optional[float] = None
    local_row_sqnr_db: Optional[float] = None

    @property
    def proxy_db(self) -> float:
        """The sensitivity proxy: local mean per-row SQNR (falling back to what was measured)."""
        for field in PROXY_FIELDS:
            value = getattr(self, field)
            if value is not None:
                return value
        return self.sqnr_db

    def to_row(self, calibrator: Optional[str]) -> Dict[str, Any]:
        """A row for :meth:`quantlab.store.RunStore.add_layer_stats`."""
        return {"calibrator": calibrator, "layer": self.layer, **{k: v for k, v in dataclasses.asdict(self).items() if k != "layer"}}


ROW_SQNR_CAP_DB = 100.0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows, features]``: tokens of Linear outputs, samples of convolution outputs."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    if t.dim() <= 3:
        return t.reshape(-1, t.shape[-1])
    return t.reshape(t.shape[0], -1)


class _Accumulator:
    __slots__ = ("signal", "noise", "dot", "quant", "row_db_sum", "rows")

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quant = self.row_db_sum = 0.0
        self.rows = 0

    def add(self, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        if reference.shape != quantized.shape:
            raise EvaluationError(f"output shapes differ between the FP32 and INT8 model ({list(reference.shape)} vs {list(quantized.shape)})")
        x = _rows(reference.detach().double())
        q = _rows(quantized.detach().double())
        row_signal = x.pow(2).sum(dim=1)
        row_noise = (x - q).pow(2).sum(dim=1)
        self.signal += float(row_signal.sum())
        self.noise += float(row_noise.sum())
        self.dot += float((x * q).sum())
        self.quant += float(q.pow(2).sum())
        # Per-row SQNR in dB, capped; a row without error counts as the cap, a zero row with error as -cap.
        ratio = row_signal / row_noise.clamp_min(1e-300)
        row_db = torch.where(row_noise == 0, torch.full_like(ratio, ROW_SQNR_CAP_DB),
                             10.0 * torch.log10(ratio.clamp_min(1e-10))).clamp(-ROW_SQNR_CAP_DB, ROW_SQNR_CAP_DB)
        self.row_db_sum += float(row_db.sum())
        self.rows += int(row_db.numel())

    def row_sqnr_db(self) -> float:
        return self.row_db_sum / self.rows if self.rows else math.nan

    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    def cosine(self) -> float:
        if self.noise == 0.0:
            return 1.0
        denominator = math.sqrt(self.signal * self.quant)
        return max(-1.0, min(1.0, self.dot / denominator)) if denominator > 0 else 0.0


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
            row_sqnr_db=end_to_end[n].row_sqnr_db(),
            local_row_sqnr_db=alone[n].row_sqnr_db() if local else None,
        )
        for n in names
    ]
