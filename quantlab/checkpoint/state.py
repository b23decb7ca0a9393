"""The floating-point state dict of a (possibly quantized) model: what a checkpoint stores."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantlab.tensor_quantizer import TensorQuantizer


def float_state_dict(model: nn.Module, overrides: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under the names the FP32 model uses, on the CPU.

    Quantizers are left out (their ranges live in the scales file); a parametrized
    weight is stored as its floating-point original under the plain name
    (``conv.weight``, not ``conv.parametrizations.weight.original``).

    Args:
        model: The model, with or without quantizers.
        overrides: ``{"<module>:weight" | "<module>:bias": tensor}`` to store instead of
            what the model holds (one calibrator's refined weights,
            :attr:`quantlab.pipeline.PTQResult.refined_weights`).
    """
    quantizer_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, TensorQuantizer) and name)
    out: Dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (TensorQuantizer, parametrize.ParametrizationList)):
            continue
        prefix = f"{module_name}." if module_name else ""
        if f"{prefix}".startswith(quantizer_prefixes) or ".parametrizations." in f".{prefix}":
            continue
        tensors = dict(module.named_parameters(recurse=False))
        tensors.update((n, b) for n, b in module.named_buffers(recurse=False)
                       if n not in getattr(module, "_non_persistent_buffers_set", set()))
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                tensors[name] = plist.original
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            key = f"{prefix}{name}"
            override = (overrides or {}).get(f"{module_name}:{name}")
            value = override if override is not None else tensor
            out[key] = value.detach().to("cpu").contiguous().clone()
    return out


__all__ = ["float_state_dict"]
