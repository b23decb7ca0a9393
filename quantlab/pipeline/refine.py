"""The pipeline's ``refine`` stage: algorithms that adjust the weights of the quantized
model once its ranges are known (AdaRound, bias correction). The algorithms live in
:mod:`quantlab.algorithms`."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from quantlab.algorithms import Algorithm, AlgorithmReport, Stage, run_stage
from quantlab.attach import iter_quantizers, original_weight
from quantlab.pipeline.apply import apply
from quantlab.pipeline.types import Ranges
from quantlab.tensor_quantizer import Role


def refine(model: nn.Module, ranges: Ranges, algorithms: Sequence[Algorithm],
           forward_loop: Optional[Callable[[nn.Module], Any]] = None, config: Any = None,
           reference_state: Optional[Dict[str, torch.Tensor]] = None) -> List[AlgorithmReport]:
    """Runs the refiners among ``algorithms`` with ``ranges`` in place; returns their reports.

    The model fake-quantizes with ``ranges`` while they run (they reconstruct the
    quantized network's outputs), and keeps the weights they leave.

    Args:
        reference_state: The float weights before any refiner ran (:func:`refinable_state`;
            taken here when None): each refiner compares with this FP32 model, also
            after an earlier refiner changed the float weights.
    """
    refiners = [a for a in algorithms if a.stage is Stage.REFINE]
    if not refiners:
        return []
    apply(model, ranges)
    params = {a.name: config.params_of(a.name) for a in refiners} if config is not None else None
    if reference_state is None and len(refiners) > 1:
        reference_state = refinable_state(model)
    return run_stage(model, refiners, Stage.REFINE, forward_loop=forward_loop, params=params, config=config,
                     reference_state=reference_state)


def refinable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of what refiners may change: every quantized layer's float weight and bias."""
    state: Dict[str, torch.Tensor] = {}
    for ref in iter_quantizers(model):
        if ref.role is Role.WEIGHT:
            state[f"{ref.module_name}:weight"] = original_weight(ref.module).detach().clone()
            bias = getattr(ref.module, "bias", None)
            if isinstance(bias, torch.Tensor):
                state[f"{ref.module_name}:bias"] = bias.detach().clone()
    return state


def restore_refinable_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Puts back weights and biases saved by :func:`refinable_state`.

    A bias the state does not hold (a refiner gave the layer one: bias correction)
    is removed again, and one it holds is given back to a layer without one, so the
    layer is as it was when the state was taken.
    """
    with torch.no_grad():
        for ref in iter_quantizers(model):
            if ref.role is not Role.WEIGHT:
                continue
            weight = original_weight(ref.module)
            weight.copy_(state[f"{ref.module_name}:weight"])
            bias = getattr(ref.module, "bias", None)
            saved = state.get(f"{ref.module_name}:bias")
            if isinstance(bias, torch.Tensor):
                if saved is not None:
                    bias.copy_(saved)
                else:
                    ref.module.bias = None
            elif saved is not None:
                ref.module.bias = nn.Parameter(saved.detach().clone().to(weight.device, weight.dtype))
