"""One-line descriptions of a model's weighted layers ("Conv2d 1→32 3×3 s2"), for tables and charts.

A module name such as ``0`` or ``features.4`` says little on its own; the
dashboard shows it beside the layer's type and shape. Pure reading of the
module objects: nothing runs, nothing is written.
"""
from __future__ import annotations

from typing import Dict

from torch import nn


def _dims(values) -> str:
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    return "×".join(str(int(v)) for v in values)


def describe_module(module: nn.Module) -> str:
    """``"Conv2d 1→32 3×3 s2"``, ``"Linear 128→10"``, ``"Conv2d dw 32 3×3"`` (depthwise), else the class name.

    Stride and groups are shown only where they are not 1; a weight without a
    known layout is described by its shape (``"MyLayer weight 64×3×3"``).
    """
    kind = type(module).__name__
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = int(module.groups)
        cin, cout = int(module.in_channels), int(module.out_channels)
        text = f"{kind} dw {cout}" if groups > 1 and groups == cin else f"{kind} {cin}→{cout}"
        text += f" {_dims(module.kernel_size)}"
        strides = tuple(module.stride) if isinstance(module.stride, (tuple, list)) else (module.stride,)
        if any(int(s) != 1 for s in strides):
            text += f" s{strides[0]}" if len(set(strides)) == 1 else f" s{_dims(strides)}"
        if 1 < groups != cin:
            text += f" g{groups}"
        return text
    if isinstance(module, nn.Linear):
        return f"{kind} {module.in_features}→{module.out_features}"
    if isinstance(weight, nn.Parameter) and weight.dim() >= 1:
        return f"{kind} weight {_dims(weight.shape)}"
    return kind


def describe_layers(model: nn.Module) -> Dict[str, str]:
    """Module name -> :func:`describe_module` for every module holding a weight (module order)."""
    out: Dict[str, str] = {}
    for name, module in model.named_modules():
        if name and isinstance(getattr(module, "weight", None), nn.Parameter):
            out[name] = describe_module(module)
    return out


__all__ = ["describe_layers", "describe_module"]
