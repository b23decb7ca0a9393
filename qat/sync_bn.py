"""BatchNorm statistics over the whole global batch under DDP (SyncBatchNorm), reverted after training.

Under DDP each rank normalizes with the statistics of its own shard of the
batch: N GPUs at batch B/N then train a slightly different (noisier) model than
one GPU at batch B. SyncBatchNorm all-reduces the statistics so the two match.
The swap shares every parameter, buffer and hook with the original BatchNorm
(the optimizer and the caller's references stay valid, a frozen BatchNorm stays
frozen) and is undone afterwards, so the model the caller exports holds plain
BatchNorm layers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

from torch import nn


def _synced(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[nn.SyncBatchNorm, set]:
    """The SyncBatchNorm, and the names of its own attributes (the rest it shares with ``bn``)."""
    sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    own = {k for k in sync.__dict__ if k not in bn.__dict__}  # e.g. process_group
    # The very same Parameter and buffer dicts (updates land in the original module), hook dicts
    # (a frozen BatchNorm's pre-hook, the user's hooks keep running) and extra attributes.
    for key, value in bn.__dict__.items():
        if key not in ("_modules",):
            sync.__dict__[key] = value
    return sync, own


def _swap_back(sync: nn.Module, original: nn.Module, own: set) -> None:
    """Attributes set on the synced copy during the run (a freeze marker, the mode) go back too."""
    for key, value in sync.__dict__.items():
        if key not in own and key != "_modules":
            original.__dict__[key] = value


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Runs the block with every plain BatchNorm of ``model`` replaced by a SyncBatchNorm.

    BatchNorms folded into convolutions (:mod:`quantlab.qat.bn_fold`) are left
    alone: their wrapper computes the batch statistics itself. Yields the
    number of layers swapped.
    """
    from quantlab.qat.bn_fold import is_folded

    swapped: List[Tuple[nn.Module, str, nn.Module, set]] = []
    if enabled:
        folded = {id(m.bn) for m in model.modules() if is_folded(m)}
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if (isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
                        and id(child) not in folded):
                    sync, own = _synced(child)
                    setattr(parent, name, sync)
                    swapped.append((parent, name, child, own))
    try:
        yield len(swapped)
    finally:
        for parent, name, original, own in swapped:
            _swap_back(getattr(parent, name), original, own)
            setattr(parent, name, original)
