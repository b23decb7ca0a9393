"""Small PTQ algorithms for tests of the plumbing around them (checkpoints, CLI, compare rows, export).

They are real algorithms in the registry's sense (they change the model through the
pipeline's contract), written for the demo CNN, and registered only for the test
that asks for them (:func:`register`, with pytest's ``monkeypatch``):

* ``test-rescale`` (transform, data-free): scales BatchNorm output channels by
  positive factors and divides the next conv's input channels by the same
  factors across a ReLU: the FP32 function is kept exactly (up to rounding).
* ``test-clamp`` (transform, data-free, STRUCTURAL): replaces every ``nn.ReLU`` by a
  :class:`ClampMin` module holding its lower bound as a buffer (the same function).
* ``test-nudge`` (refiner, needs data): scales each quantized layer's weight by a
  factor that depends on its input range (so each calibrator gets other weights)
  and gives convs without a bias one (as bias correction does).
"""
from __future__ import annotations

import torch
from torch import nn

from quantlab.algorithms import AlgorithmError, Stage
from quantlab.algorithms import base as algorithms_base
from quantlab.attach import iter_quantizers, original_weight
from quantlab.tensor_quantizer import Role

NAMES = ("test-rescale", "test-clamp", "test-nudge")


class ClampMin(nn.Module):
    """``max(x, low)`` with ``low`` a buffer: a ReLU whose bound a transform may have moved."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, self.low)


def _pairs(model: nn.Module):
    """(BatchNorm, next conv) pairs of the demo CNN whose BN output feeds only that conv through a ReLU."""
    pairs = []
    stem, down1 = getattr(model, "stem", None), getattr(model, "down1", None)
    if isinstance(stem, nn.Sequential) and isinstance(down1, nn.Sequential):
        pairs.append((stem[1], down1[0]))
    for block in (getattr(model, "block1", None), getattr(model, "block2", None)):
        if block is not None:
            pairs.append((block.bn1, block.conv2))
    return pairs


def rescale(model: nn.Module, context) -> dict:
    factor = float(context.params.get("factor", 2.0))
    pairs = _pairs(model)
    if not pairs:
        raise AlgorithmError("test-rescale: no BatchNorm -> ReLU -> conv pair in this model")
    with torch.no_grad():
        for bn, conv in pairs:
            channels = bn.num_features
            scale = torch.tensor([factor ** ((c % 3) - 1) for c in range(channels)], dtype=bn.weight.dtype)
            bn.weight.mul_(scale)
            bn.bias.mul_(scale)
            conv.weight.div_(scale.view(1, -1, 1, 1))
    return {"pairs": len(pairs), "factor": factor}


def clamp(model: nn.Module, context) -> dict:
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, ClampMin())
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return {"replaced": replaced}


def nudge(model: nn.Module, context) -> dict:
    with torch.no_grad():
        context.forward_loop(model)  # a refiner sees the calibration data
        layers = 0
        for ref in iter_quantizers(model):
            if ref.role is not Role.WEIGHT:
                continue
            inp = ref.module.__dict__["_modules"].get("input_quantizer")
            amax = float(inp.amax.reshape(-1)[0]) if inp is not None else 1.0
            weight = original_weight(ref.module)
            weight.mul_(1.0 + 0.02 * (amax % 1.0))
            if isinstance(ref.module, nn.Conv2d) and ref.module.bias is None:
                ref.module.bias = nn.Parameter(torch.full((weight.shape[0],), 1e-3 * amax, dtype=weight.dtype))
            layers += 1
    return {"layers": layers, "loss": float("nan")}  # a NaN detail must not break any file


def register(monkeypatch) -> None:
    """Registers the three for one test (monkeypatch removes them afterwards)."""
    entries = [
        ("test-rescale", Stage.TRANSFORM, 900, rescale, False, "test: rescale BN/conv pairs", {"factor": 2.0}),
        ("test-clamp", Stage.TRANSFORM, 901, clamp, False, "test: ReLU -> ClampMin module", {}),
        ("test-nudge", Stage.REFINE, 900, nudge, True, "test: nudge weights by input range", None),
    ]
    for name, stage, order, fn, needs_data, description, params in entries:
        monkeypatch.setitem(algorithms_base._REGISTRY, name, algorithms_base.Algorithm(
            name, stage, order, fn, needs_data, description, None, params))
