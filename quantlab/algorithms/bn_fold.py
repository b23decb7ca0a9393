"""``bn-fold``: folds every inference BatchNorm into the Conv or Linear that feeds it.

An inference BatchNorm is a per-channel affine map, ``y = x * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``;
after a Conv/Linear it folds exactly into that layer:
``W' = W * scale`` (per output channel), ``b' = b * scale + shift``. TensorRT does
the same fold before it quantizes, so the weights INT8 rounds are the folded
ones: folding here makes calibration, cross-layer equalization and the
refiners see the tensors that will really be rounded.

Pairs are found on the data flow (:mod:`quantlab.algorithms._graph`): a BatchNorm
whose input is the output of a Conv/Linear (any subclass, e.g. EfficientNet's
``Conv2dStaticSamePadding``) that nothing else reads, each module called once.
When fx cannot trace the model, only consecutive children of plain
``nn.Sequential`` containers are folded (the one place where "next in the module
list" provably means "fed by"). Every BatchNorm left unfolded is reported with
the reason. The folded BatchNorm's place holds an ``nn.Identity``.

Folding uses running statistics: the folded model computes what the original
computes in eval mode (the mode PTQ runs in). A Linear followed by a
BatchNorm1d is folded as a ``[batch, features]`` layer (BatchNorm1d normalizes
dim 1, the Linear's features only in that layout).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from quantlab.algorithms._graph import module_uses, plain_sequentials, set_submodule, trace
from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, Stage, register_algorithm
from quantlab.attach import is_quantized

#: Layers a BatchNorm can fold into (subclasses included): output channels on weight axis 0.
FOLDABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ORDER = 10  # first transform: equalization and smoothing work on folded weights


def bn_scale_shift(bn: _BatchNorm, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inference BatchNorm as ``x * scale + shift`` per channel (running statistics).

    Differentiable in the BatchNorm's affine parameters (QAT's folded modules use it).

    Args:
        bn: A BatchNorm with running statistics.
        dtype: Compute in this dtype (float64 for an exact fold); default the statistics' dtype.
    """
    var = bn.running_var if dtype is None else bn.running_var.to(dtype)
    mean = bn.running_mean if dtype is None else bn.running_mean.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = (bn.weight if dtype is None else bn.weight.to(dtype)) * scale
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + (bn.bias if dtype is None else bn.bias.to(dtype))
    return scale, shift


def out_channels(layer: nn.Module) -> int:
    """Output channels of a Conv/Linear (weight axis 0)."""
    return int(layer.weight.shape[0])


def fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """Folds ``bn`` into ``layer`` in place (computed in float64); gives ``layer`` a bias if it had none."""
    with torch.no_grad():
        scale, shift = bn_scale_shift(bn, torch.float64)
        weight = layer.weight
        shape = [-1] + [1] * (weight.dim() - 1)
        weight.copy_((weight.double() * scale.reshape(shape)).to(weight.dtype))
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        new_bias = (bias * scale + shift).to(device=weight.device, dtype=weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
        else:
            layer.bias.copy_(new_bias)


def _has_stateful_children(layer: nn.Module) -> bool:
    """Whether a submodule holds parameters or buffers (a Conv subclass's padding module holds none;
    QAT's Conv+BN modules hold their BatchNorm)."""
    return any(True for child in layer.children() for _ in child.parameters()) or any(
        True for child in layer.children() for _ in child.buffers())


def is_plain_layer(module: Optional[nn.Module]) -> bool:
    """A Conv/Linear (or subclass) whose weight and bias a transform may rescale per channel."""
    return (isinstance(module, FOLDABLE_TYPES) and not parametrize.is_parametrized(module)
            and not _has_stateful_children(module))


def why_not_foldable(layer: Optional[nn.Module], bn: _BatchNorm) -> Optional[str]:
    """Why ``bn`` cannot fold into ``layer`` (None if it can)."""
    if layer is None or not isinstance(layer, FOLDABLE_TYPES):
        return f"its input is not a Conv or Linear output ({type(layer).__name__ if layer is not None else 'no module'})"
    if parametrize.is_parametrized(layer):
        return "the layer's weight is parametrized (quantizers or a sparsity mask attached)"
    if _has_stateful_children(layer):
        return f"{type(layer).__name__} has submodules with state (its forward may not be a plain affine map)"
    if not bn.track_running_stats or bn.running_var is None or bn.running_mean is None:
        return "the BatchNorm has no running statistics"
    if bn.num_features != out_channels(layer):
        return f"channels differ ({out_channels(layer)} outputs, BatchNorm of {bn.num_features})"
    return None


def find_bn_pairs(model: nn.Module) -> Tuple[List[Tuple[str, str]], Dict[str, str], str, Optional[str]]:
    """Finds foldable ``(layer name, bn name)`` pairs.

    Returns:
        ``(pairs, skipped, method, trace_error)``: ``skipped`` maps every other
        BatchNorm to the reason; ``method`` is ``"fx"`` or ``"sequential"``;
        ``trace_error`` says why fx failed (then ``method`` is ``"sequential"``).
    """
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    pairs: List[Tuple[str, str]] = []
    skipped: Dict[str, str] = {}
    flow, error = trace(model)
    if flow is not None:
        seen = set()
        for node in flow.module_nodes():
            bn = flow.module(node)
            if not isinstance(bn, _BatchNorm):
                continue
            seen.add(node.target)
            src = node.args[0] if node.args else None
            if not flow.called_once(node):
                skipped[node.target] = f"the BatchNorm is called {flow.calls[node.target]} times"
                continue
            if getattr(src, "op", None) != "call_module":
                skipped[node.target] = f"its input is not a module's output ({getattr(src, 'op', 'constant')} {getattr(src, 'target', '')})"
                continue
            if len(src.users) != 1:
                skipped[node.target] = f"the output of '{src.target}' is also used elsewhere"
                continue
            if not flow.called_once(src):
                skipped[node.target] = f"'{src.target}' is called {flow.calls[src.target]} times"
                continue
            reason = why_not_foldable(flow.module(src), bn)
            if reason:
                skipped[node.target] = reason
            else:
                pairs.append((src.target, node.target))
        for name in bns:
            if name not in seen:
                skipped[name] = "the BatchNorm is not called in the traced forward"
        return pairs, skipped, "fx", None
    uses = module_uses(model)
    for prefix, seq in plain_sequentials(model):
        children = list(seq.named_children())
        for (lname, layer), (bname, bn) in zip(children, children[1:]):
            if not isinstance(bn, _BatchNorm):
                continue
            if uses[id(layer)] > 1 or uses[id(bn)] > 1:
                continue
            if why_not_foldable(layer, bn) is None:
                dot = f"{prefix}." if prefix else ""
                pairs.append((dot + lname, dot + bname))
    paired = {b for _, b in pairs}
    for name in bns:
        if name not in paired:
            skipped[name] = "not traceable and not directly after a Conv/Linear in a plain nn.Sequential"
    return pairs, skipped, "sequential", error


def fold_batchnorms(model: nn.Module) -> Dict[str, Any]:
    """Folds every foldable BatchNorm of ``model`` in place; returns what was done (JSON-safe).

    Raises:
        AlgorithmError: ``model`` already carries quantizers.
    """
    if is_quantized(model):
        raise AlgorithmError("bn-fold runs on the floating-point model, before quantizers are attached")
    pairs, skipped, method, error = find_bn_pairs(model)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        fold_into(modules[layer_name], modules[bn_name])
        set_submodule(model, bn_name, nn.Identity())
    details: Dict[str, Any] = {
        "method": method,
        "folded": [{"layer": layer, "batchnorm": bn} for layer, bn in pairs],
        "not_folded": [{"batchnorm": bn, "reason": why} for bn, why in sorted(skipped.items())],
    }
    if error:
        details["trace_error"] = error
    if not pairs and not skipped:
        details["note"] = "the model has no BatchNorm"
    return details


@register_algorithm("bn-fold", Stage.TRANSFORM, ORDER, params={},
                    description="fold inference BatchNorms into the preceding Conv/Linear (exact)")
def run_bn_fold(model: nn.Module, context: AlgorithmContext) -> Dict[str, Any]:
    """The ``bn-fold`` transform (no parameters)."""
    if context.params:
        raise AlgorithmError(f"bn-fold takes no parameters, got {sorted(context.params)}")
    return fold_batchnorms(model)
