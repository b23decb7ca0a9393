"""Quantization-aware training: fine-tune a fake-quantized model to recover INT8 accuracy.

Inside any PyTorch training script::

    from quantlab import qat
    model = qat.prepare(model, scales="runs/x/scales.entropy.json")   # or data=calibration_loader
    ...                                                               # the unchanged training loop
    qat.save(model, "runs/x-qat")                                     # scales + weights for export

Lightning: ``L.Trainer(callbacks=[qat.LightningCallback(scales=...)])``;
Hugging Face: ``Trainer(..., callbacks=[qat.HFTrainerCallback(scales=...)])``;
built-in loop: ``quantlab qat`` (also under ``torchrun``).

The callbacks import their frameworks lazily: ``from quantlab import qat`` works
without them, and touching ``qat.LightningCallback`` without lightning installed
raises :class:`MissingDependencyError` with the pip command.
"""
from __future__ import annotations

from typing import Any

from quantlab.qat.bn_fold import find_conv_bn_pairs, fold_conv_bn, freeze_bn_stats, undo_fold
from quantlab.qat.errors import MissingDependencyError, NonFiniteLossError, QATError
from quantlab.qat.graphs import graphed
from quantlab.qat.hooks import enabled, quantization_disabled, set_amax_trainable, set_enabled
from quantlab.qat.learnable import lsq_fake_quantize, lsq_grad_factor
from quantlab.qat.prepare import (
    QATOptions,
    convert,
    deployable_state,
    is_prepared,
    load,
    prepare,
    qat_options,
    refresh_weight_ranges,
    save,
)
from quantlab.qat.quantizer import QATQuantizer

_LAZY = {
    "LightningCallback": ("quantlab.qat.lightning", "LightningCallback"),
    "HFTrainerCallback": ("quantlab.qat.hf", "HFTrainerCallback"),
    "train": ("quantlab.qat.loop", "train"),
    "TrainConfig": ("quantlab.qat.loop", "TrainConfig"),
    "run_qat": ("quantlab.qat.run", "run_qat"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'quantlab.qat' has no attribute {name!r}")


__all__ = [
    "prepare", "save", "load", "convert", "is_prepared", "qat_options", "QATOptions", "deployable_state", "refresh_weight_ranges",
    "quantization_disabled", "enabled", "set_enabled", "set_amax_trainable", "freeze_bn_stats",
    "fold_conv_bn", "find_conv_bn_pairs", "undo_fold", "lsq_fake_quantize", "lsq_grad_factor", "QATQuantizer",
    "graphed", "QATError", "NonFiniteLossError", "MissingDependencyError",
    "LightningCallback", "HFTrainerCallback", "train", "TrainConfig", "run_qat",
]
