"""BatchNorm statistics over the whole global batch under DDP (SyncBatchNorm), reverted after training.

Under DDP each rank normalizes with the statistics of its own shard of the
batch: N GPUs at batch B/N then train a slightly different (noisier) model than
one GPU at batch B. SyncBatchNorm all-reduces the statistics so the two match.
The swap shares every parameter and buffer with the original BatchNorm (the
optimizer and the caller's references stay valid) and is undone afterwards, so
the model the caller exports holds plain BatchNorm layers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

from torch import nn


def _synced(bn: nn.modules.batchnorm._BatchNorm) -> nn.SyncBatchNorm:
    sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    # The very same Parameter and buffer objects: updates land in the original module.
    sync._parameters = bn._parameters
    sync._buffers = bn._buffers
    sync.training = bn.training
    return sync


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Runs the block with every plain BatchNorm of ``model`` replaced by a SyncBatchNorm.

    BatchNorms folded into convolutions (:mod:`quantlab.qat.bn_fold`) are left
    alone: their wrapper computes the batch statistics itself. Yields the
    number of layers swapped.
    """
    from quantlab.qat.bn_fold import is_folded

    swapped: List[Tuple[nn.Module, str, nn.Module]] = []
    if enabled:
        folded = {id(m.bn) for m in model.modules() if is_folded(m)}
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if (isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
                        and id(child) not in folded):
                    setattr(parent, name, _synced(child))
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, original in swapped:
            original.training = getattr(parent, name).training
            setattr(parent, name, original)
