"""Quantized checkpoints: the weights PTQ algorithms changed, beside the scales that go with them.

Once transforms (BN folding, equalization, smoothing) or refiners (bias correction,
AdaRound) have changed a model's weights, its scales file alone no longer rebuilds
the quantized model. A checkpoint ``model.<calibrator>.safetensors`` holds the
floating-point state dict of the transformed, refined model (no pickle: safetensors)
and, in its header, what made it (config, calibrator, the algorithms' reports, the
scales file it pairs with and that file's SHA-256).

:func:`load_checkpoint` takes the FP32 model from its factory, redoes the
transforms' structural changes without data, loads the weights strictly (names,
shapes, dtypes, finiteness checked first) and then the scales.
"""
from quantlab.checkpoint.format import (
    CHECKPOINT_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointFormatError,
    CheckpointInfo,
    CheckpointMismatchError,
    read_checkpoint,
)
from quantlab.checkpoint.load import load_checkpoint, paired_scales, rebuild_structure
from quantlab.checkpoint.save import changes_weights, checkpoint_name, save_checkpoint, save_ptq_files, scales_name
from quantlab.checkpoint.state import float_state_dict

__all__ = [
    "CHECKPOINT_SUFFIX", "FORMAT_NAME", "FORMAT_VERSION", "CheckpointFormatError", "CheckpointInfo",
    "CheckpointMismatchError", "changes_weights", "checkpoint_name", "float_state_dict", "load_checkpoint", "paired_scales",
    "read_checkpoint", "rebuild_structure", "save_checkpoint", "save_ptq_files", "scales_name",
]
