"""The 2:4 pattern: masks along a weight's input dimension, checks, and which layers to prune.

TensorRT's sparse kernels need, for every output channel (and every kernel position
of a conv), at most two non-zeros in each group of four consecutive INPUT channels:
for a Conv weight ``[K, C, R, S]`` the groups are ``weights[k, 4c:4c+4, r, s]``, for a
Linear ``[out, in]`` they are ``weight[o, 4i:4i+4]``; ``C`` must be a multiple of 4
(TensorRT developer guide, "Structured Sparsity"). cuSPARSELt's structured operand is
the same: 2:4 along the GEMM's reduction dimension.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantlab.registry import lookup_quantizable
from quantlab.sparsity.errors import SparsityError

#: Keep N of every M consecutive weights along the input dimension.
N, M = 2, 4
PATTERN = f"{N}:{M}"
_WILDCARDS = set("*?[")


def input_axis(module: nn.Module) -> Optional[int]:
    """The input-channel axis of a prunable module's weight, or None if it is not prunable.

    Linear / Conv weights are ``[out, in, ...]`` (axis 1); a GPT-2 style Conv1D stores
    ``[in, out]`` (axis 0). ConvTranspose is not prunable: TensorRT documents sparse
    kernels for convolutions and fully connected layers only.
    """
    entry = lookup_quantizable(module)
    if entry is None or entry.op_type == "ConvTranspose":
        return None
    return 1 if entry.weight_axis == 0 else 0


def grouped(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A view-like copy of ``weight`` with the input axis last, split in groups of 4: ``[..., C // 4, 4]``."""
    moved = weight.movedim(axis, -1)
    channels = moved.shape[-1]
    if channels % M:
        raise SparsityError(f"input dimension {channels} is not a multiple of {M}")
    return moved.reshape(*moved.shape[:-1], channels // M, M)


def _ungroup(groups: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(axis))
    return groups.reshape(moved_shape).movedim(-1, axis)


def mask_2to4(weight: torch.Tensor, axis: int = 1, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask keeping the 2 largest ``|scores|`` (default ``|weight|``) of every 4 along ``axis``."""
    score = (weight if scores is None else scores).detach().abs().to(torch.float32)
    groups = grouped(score, axis)
    keep = groups.topk(N, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return _ungroup(mask, weight.shape, axis)


def group_violations(weight: torch.Tensor, axis: int = 1) -> Tuple[int, int]:
    """``(groups with more than 2 non-zeros, all groups)`` along ``axis``."""
    nonzero = grouped(weight.detach() != 0, axis).sum(dim=-1)
    return int((nonzero > N).sum()), int(nonzero.numel())


def is_2to4(weight: torch.Tensor, axis: int = 1) -> bool:
    """Whether every group of 4 along ``axis`` holds at most 2 non-zeros (False if the axis is not a multiple of 4)."""
    if weight.shape[axis] % M:
        return False
    return group_violations(weight, axis)[0] == 0


@dataclasses.dataclass(frozen=True)
class Target:
    """One layer selected for pruning."""

    name: str
    module: nn.Module
    weight_name: str
    axis: int

    @property
    def weight(self) -> torch.Tensor:
        """The stored (un-parametrized) weight: what pruning changes."""
        return stored_weight(self.module, self.weight_name)


def stored_weight(module: nn.Module, weight_name: str = "weight") -> torch.Tensor:
    """The weight tensor a module stores (``parametrizations.<name>.original`` when parametrized)."""
    if parametrize.is_parametrized(module, weight_name):
        return module.parametrizations[weight_name].original
    return getattr(module, weight_name)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Layers to prune and layers a wildcard matched but that cannot be pruned (with why)."""

    targets: List[Target]
    skipped: List[Tuple[str, str]]


def _prunable(model: nn.Module) -> List[Tuple[str, nn.Module, str, Optional[int]]]:
    out = []
    for name, module in model.named_modules():
        entry = lookup_quantizable(module)
        if entry is None:
            continue
        out.append((name, module, entry.weight_name, input_axis(module)))
    return out


def ineligible_reason(module: nn.Module, weight: torch.Tensor, axis: Optional[int]) -> Optional[str]:
    """Why a layer cannot be 2:4 along its input dimension, or None if it can."""
    if axis is None:
        return f"{type(module).__name__} has no sparse kernels in TensorRT (only Conv and fully connected layers do)"
    channels = int(weight.shape[axis])
    if channels % M:
        groups = getattr(module, "groups", 1)
        per_group = f" ({channels} per group of a {groups}-group conv)" if groups and groups > 1 else ""
        return f"input dimension {channels}{per_group} is not a multiple of {M}"
    return None


def select_layers(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (), *, strict: bool = False) -> Selection:
    """The layers ``include`` / ``exclude`` (fnmatch patterns of module names) select for 2:4 pruning.

    A layer named explicitly (a pattern without wildcards) must be prunable; one
    matched only by a wildcard is skipped (and reported) when it is not, unless
    ``strict``.

    Raises:
        SparsityError: a pattern matches no prunable layer, an explicitly named layer
            (or with ``strict`` any selected one) cannot be 2:4, or nothing is selected.
    """
    include, exclude = list(include), list(exclude)
    candidates = _prunable(model)
    names = [n for n, *_ in candidates]
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    for pattern in include + exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise SparsityError(
                f"pattern {pattern!r} matches no prunable layer of {type(model).__name__} "
                f"(Linear and Conv layers: {shown or 'none'})"
            )
    targets: List[Target] = []
    skipped: List[Tuple[str, str]] = []
    problems: List[str] = []
    for name, module, weight_name, axis in candidates:
        matched = [p for p in include if fnmatch.fnmatchcase(name, p)]
        if not matched or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        weight = stored_weight(module, weight_name)
        reason = ineligible_reason(module, weight, axis)
        if reason is None:
            targets.append(Target(name, module, weight_name, int(axis)))  # type: ignore[arg-type]
        elif strict or any(not (_WILDCARDS & set(p)) for p in matched):
            problems.append(f"layer '{name}' (weight {tuple(weight.shape)}): {reason}")
        else:
            skipped.append((name, reason))
    if problems:
        raise SparsityError(
            f"cannot prune to {PATTERN} along the input dimension: " + "; ".join(problems)
            + "; exclude these layers (they stay dense)"
        )
    if not targets:
        why = "; ".join(f"{n}: {r}" for n, r in skipped[:5]) or "no layer matched"
        raise SparsityError(f"nothing to prune to {PATTERN} in {type(model).__name__} ({why})")
    return Selection(targets, skipped)


__all__ = [
    "M", "N", "PATTERN", "Selection", "Target", "group_violations", "grouped", "ineligible_reason", "input_axis",
    "is_2to4", "mask_2to4", "select_layers", "stored_weight",
]
