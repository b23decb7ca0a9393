"""Ranges checked against the model they are loaded into (what a file alone cannot tell).

A zero weight amax is exact only where the weights are zero (a pruned channel);
on live weights it collapses the channel to 0 without any other sign.
"""
from __future__ import annotations

from typing import Any, List

import torch
from torch import nn


def zero_weight_range_problems(key: str, amax: Any, module: nn.Module, spec: Any) -> List[str]:
    """Messages for channels whose file amax is 0 while the module's weights there are not.

    Args:
        key: ``"module:weight"`` (for messages).
        amax: The file's amax (a float or one per channel).
        module: The quantized module (its weight parametrized by quantlab).
        spec: The weight quantizer's :class:`~quantlab.config.QuantizerSpec`.
    """
    from quantlab.functional import amax_of_weight

    values = amax if isinstance(amax, list) else [amax]
    if all(v > 0 for v in values):
        return []
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or not len(parametrizations):
        return []
    original = next(iter(parametrizations.values())).original
    actual = amax_of_weight(original, spec).reshape(-1).tolist()
    if len(actual) != len(values):
        return []  # the shape check reports it
    live = [i for i, (v, a) in enumerate(zip(values, actual)) if v == 0 and a > 0]
    if not live:
        return []
    shown = ", ".join(map(str, live[:8])) + (" ..." if len(live) > 8 else "")
    what = f"channel(s) {shown}" if isinstance(amax, list) else "the tensor"
    return [f"'{key}': amax 0 for {what} whose weights are not zero (max |w| {max(actual[i] for i in live):.4g}): "
            "that would quantize live weights to 0; recalibrate or fix the file"]


__all__ = ["zero_weight_range_problems"]
