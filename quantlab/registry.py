"""Registry of quantizable module types, keyed by fully qualified class name.

Keys are strings, so optional libraries (Hugging Face transformers) are matched
without importing them. A module matches if any class in its MRO is registered,
so every subclass (including ones that override ``forward``) is covered.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Union

from torch import nn


@dataclasses.dataclass(frozen=True)
class QuantizableType:
    """How to quantize one module type.

    Attributes:
        weight_name: Attribute holding the weight parameter.
        weight_axis: Output-channel axis of that weight (per-channel scales).
        op_type: The ONNX operator the module exports to (Conv, ConvTranspose, Gemm, MatMul).
    """

    weight_name: str = "weight"
    weight_axis: int = 0
    op_type: str = "Gemm"


_QUANTIZABLE: Dict[str, QuantizableType] = {}


def _key(cls: Union[type, str]) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_quantizable(cls: Union[type, str], *, weight_axis: int = 0, weight_name: str = "weight", op_type: str = "Gemm") -> None:
    """Registers a module type (class or ``"package.module.Class"``) as quantizable."""
    _QUANTIZABLE[_key(cls)] = QuantizableType(weight_name=weight_name, weight_axis=weight_axis, op_type=op_type)


def lookup_quantizable(module: nn.Module) -> Optional[QuantizableType]:
    """The registration that applies to ``module`` (most derived class first), or None."""
    for cls in type(module).__mro__:
        entry = _QUANTIZABLE.get(_key(cls))
        if entry is not None:
            return entry
    return None


def list_quantizable() -> Dict[str, QuantizableType]:
    return dict(_QUANTIZABLE)


register_quantizable(nn.Linear, weight_axis=0, op_type="Gemm")
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_quantizable(_conv, weight_axis=0, op_type="Conv")
# ConvTranspose weights are [in, out / groups, ...]: output channels on axis 1.
for _convt in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_quantizable(_convt, weight_axis=1, op_type="ConvTranspose")
# Hugging Face's GPT-2-style Conv1D stores its weight as [in, out].
register_quantizable("transformers.pytorch_utils.Conv1D", weight_axis=1, op_type="Gemm")
