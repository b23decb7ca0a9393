"""The 2:4 mask as a weight parametrization, placed BEFORE the weight quantizer.

``module.parametrizations.weight`` then computes ``quantize(original * mask)``: the
fake quantization (and the per-channel range it recomputes during QAT) sees the pruned
weight, gradients reach only the kept weights, and the mask is a fixed buffer that no
optimizer step changes. Pruning also zeroes the pruned entries of ``original`` itself
("baking"), so the stored weights, a ``qat.save`` state_dict and an export are sparse
without the mask; :func:`reapply_masks` restores that after each optimizer step (the QAT
loop and the Lightning / Hugging Face callbacks call it), since weight decay or a
hand-written update could otherwise move a pruned entry the mask hides.

While a model is exported to ONNX the mask is the identity (the baked weight is already
sparse), so the graph is exactly a dense model's: ``weight -> Q -> DQ -> Gemm/Conv``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, List, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantlab.attach import remove_parametrization
from quantlab.sparsity.pattern import PATTERN


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class SparsityMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed boolean mask (a buffer, saved in state_dict).

    Args:
        mask: Boolean tensor of the weight's shape (True = kept).
        axis: The weight's input-channel axis the pattern runs along.
        pattern: ``"2:4"``.
    """

    def __init__(self, mask: torch.Tensor, *, axis: int = 1, pattern: str = PATTERN) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        self.axis = axis
        self.pattern = pattern

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if _exporting():
            return weight  # baked: the stored weight is already zero where the mask is
        return weight * self.mask

    def extra_repr(self) -> str:
        kept = float(self.mask.float().mean()) if self.mask.numel() else 0.0
        return f"{self.pattern} along axis {self.axis}, {kept:.0%} kept"


@dataclasses.dataclass(frozen=True)
class MaskRef:
    """One mask of a model: its module, the weight it applies to, and the parametrization."""

    module_name: str
    module: nn.Module
    weight_name: str
    mask: SparsityMask

    @property
    def original(self) -> torch.Tensor:
        return self.module.parametrizations[self.weight_name].original


def iter_masks(model: nn.Module) -> Iterator[MaskRef]:
    """Every :class:`SparsityMask` of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or not parametrize.is_parametrized(module):
            continue
        for weight_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparsityMask):
                    yield MaskRef(name, module, weight_name, p)


def masked_layers(model: nn.Module) -> List[str]:
    """Names of the layers holding a sparsity mask."""
    return [ref.module_name for ref in iter_masks(model)]


def attach_mask(module: nn.Module, mask: torch.Tensor, *, weight_name: str = "weight", axis: int = 1) -> SparsityMask:
    """Registers (or replaces) the mask of ``module.<weight_name>`` in FIRST position and bakes it.

    First position: before a weight quantizer already attached, so the quantizer sees
    the masked weight. Baking zeroes the pruned entries of the stored weight.
    """
    existing = next((ref for ref in iter_masks(module) if ref.module is module and ref.weight_name == weight_name), None)
    if existing is not None:
        existing.mask.mask.copy_(mask.to(torch.bool))
        existing.mask.axis = axis
        parametrization = existing.mask
    else:
        original = getattr(module, weight_name) if not parametrize.is_parametrized(module, weight_name) else module.parametrizations[weight_name].original
        if tuple(mask.shape) != tuple(original.shape):
            raise ValueError(f"mask {tuple(mask.shape)} does not fit weight {tuple(original.shape)}")
        parametrization = SparsityMask(mask.to(original.device), axis=axis)
        if parametrize.is_parametrized(module, weight_name):
            module.parametrizations[weight_name].insert(0, parametrization)
        else:
            parametrize.register_parametrization(module, weight_name, parametrization)
    with torch.no_grad():
        module.parametrizations[weight_name].original.mul_(parametrization.mask)
    return parametrization


def reapply_masks(model: nn.Module) -> int:
    """Zeroes every masked-out entry of the stored weights again (after an optimizer step); returns the count of masks."""
    count = 0
    with torch.no_grad():
        for ref in iter_masks(model):
            ref.original.mul_(ref.mask.mask)
            count += 1
    return count


def remove_masks(model: nn.Module, names: Optional[List[str]] = None) -> int:
    """Removes the masks (of ``names``, default all), keeping the weights as they are (sparse).

    A weight quantizer on the same weight stays. Safe on a deep copy of a model: the
    original keeps its masks (:func:`quantlab.attach.remove_parametrization`).
    """
    removed = 0
    for ref in list(iter_masks(model)):
        if names is not None and ref.module_name not in names:
            continue
        with torch.no_grad():
            ref.original.mul_(ref.mask.mask)  # baked: the weight stays sparse without its mask
        remove_parametrization(ref.module, ref.weight_name, ref.mask)  # safe on a deep copy: the original keeps its mask
        removed += 1
    return removed


__all__ = ["MaskRef", "SparsityMask", "attach_mask", "iter_masks", "masked_layers", "reapply_masks", "remove_masks"]
