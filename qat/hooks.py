"""Toggles for a model under QAT, usable from any training script.

    with qat.quantization_disabled(model):   # FP32 forward (e.g. a teacher pass or an FP32 eval)
        ...
    with qat.enabled(model, False):          # the same, spelled as a switch
        ...
    qat.set_enabled(model, False)            # permanently, until set_enabled(model, True)
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

from torch import nn

from quantlab.attach import iter_quantizers, quantization_disabled
from quantlab.qat.bn_fold import freeze_bn_stats
from quantlab.tensor_quantizer import QuantizerMode, TensorQuantizer


def _active_mode(quantizer: TensorQuantizer) -> QuantizerMode:
    """The mode a quantizer runs in when quantization is on."""
    mode = getattr(quantizer, "active_mode", None)
    if mode is not None:
        return mode
    return QuantizerMode.QUANTIZE if quantizer.is_calibrated else QuantizerMode.OFF


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turns every quantizer on (back to the mode prepare chose) or off, until changed again."""
    for ref in iter_quantizers(model):
        if enabled:
            ref.quantizer.restore(_active_mode(ref.quantizer))
        else:
            ref.quantizer.off()


@contextlib.contextmanager
def enabled(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Context manager: runs the block with quantization on or off, then restores every mode."""
    saved: List[Tuple[TensorQuantizer, QuantizerMode]] = [(r.quantizer, r.quantizer.mode) for r in iter_quantizers(model)]
    try:
        set_enabled(model, on)
        yield model
    finally:
        for quantizer, mode in saved:
            quantizer.restore(mode)


def set_amax_trainable(model: nn.Module, trainable: bool) -> int:
    """Freezes (or unfreezes) every learned range; returns how many there are."""
    count = 0
    for ref in iter_quantizers(model):
        amax = ref.quantizer.amax
        if getattr(ref.quantizer, "learn_amax", False):
            amax.requires_grad_(trainable)
            count += 1
    return count


__all__ = ["quantization_disabled", "enabled", "set_enabled", "set_amax_trainable", "freeze_bn_stats"]
