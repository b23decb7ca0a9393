"""2:4 structured sparsity with INT8: prune, fine-tune with the pattern fixed, export, check.

    from quantlab import sparsity
    report = sparsity.prune(model, "sparsegpt", data=calib_batches, exclude=["classifier"])
    qmodel = quantlab.quantize(model, config, forward_loop)        # the quantizer sees the masked weight
    model = qat.prepare(model, scales=...); qat.train(model, data) # the loop keeps the pattern
    sparsity.check_onnx_sparsity("model.int8.onnx")                # INT8 weights 2:4 along the input axis?

The mask is a parametrization registered before the weight quantizer
(:mod:`quantlab.sparsity.mask`); the pattern runs along the input dimension, as
TensorRT's sparse kernels need (:mod:`quantlab.sparsity.pattern`).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SparsityError": "quantlab.sparsity.errors",
    "PATTERN": "quantlab.sparsity.pattern",
    "mask_2to4": "quantlab.sparsity.pattern",
    "is_2to4": "quantlab.sparsity.pattern",
    "group_violations": "quantlab.sparsity.pattern",
    "select_layers": "quantlab.sparsity.pattern",
    "SparsityMask": "quantlab.sparsity.mask",
    "attach_mask": "quantlab.sparsity.mask",
    "iter_masks": "quantlab.sparsity.mask",
    "masked_layers": "quantlab.sparsity.mask",
    "reapply_masks": "quantlab.sparsity.mask",
    "remove_masks": "quantlab.sparsity.mask",
    "prune": "quantlab.sparsity.pruning",
    "masks_from_weights": "quantlab.sparsity.pruning",
    "PruneReport": "quantlab.sparsity.pruning",
    "METHODS": "quantlab.sparsity.pruning",
    "check_model_sparsity": "quantlab.sparsity.check",
    "check_onnx_sparsity": "quantlab.sparsity.check",
    "SparsityReport": "quantlab.sparsity.check",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantlab.sparsity' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
