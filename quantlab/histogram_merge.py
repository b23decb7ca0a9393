"""Exact merge of the statistics of one pass run in shards on several ranks.

Histogram widths are powers of two that depend only on the running max
(:mod:`quantlab.statistics`), so merging is exact: all-reduce MAX the running
maxima, let every rank re-bin its counts to the width of the common max, then
all-reduce SUM the counts. The merged histogram is bit-identical to the one a
single process would build from all shards.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from quantlab.statistics import HistogramCollector, bin_width_for, merge_pairs


def merge_across_ranks(collectors: Sequence[HistogramCollector], group: Any, device: torch.device) -> None:
    """Merges every collector's histogram with the same collectors on the other ranks, in place.

    Collective over ``group``: every rank calls it with collectors of the same
    tensors in the same order.

    Args:
        collectors: This rank's collectors (flushed or not).
        group: The process group (``torch.distributed.group.WORLD`` for all ranks).
        device: Where the collective runs (the rank's CUDA device under NCCL, else CPU).
    """
    if not collectors:
        return
    # 1. The common running max (float64 holds the float32 maxima exactly).
    maxima = torch.tensor([c.amax for c in collectors], dtype=torch.float64, device=device)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    # 2. Every rank re-bins to the width of the common max; the longest result sets the length
    #    (as HistogramCollector.merge_ would), so the counts then add up exactly.
    rebinned: List[Optional[torch.Tensor]] = []
    widths: List[Optional[float]] = []
    lengths = []
    for collector, amax in zip(collectors, maxima.tolist()):
        if amax == 0.0:
            rebinned.append(None)
            widths.append(None)
            lengths.append(0)
            continue
        width = bin_width_for(amax, collector.num_bins)
        mine = torch.zeros(1, dtype=torch.int64, device=device)
        if collector.counts is not None:
            assert collector.bin_width is not None
            mine = merge_pairs(collector.counts.to(device), int(round(math.log2(width / collector.bin_width))))
        rebinned.append(mine)
        widths.append(width)
        lengths.append(max(mine.numel(), math.ceil(amax / width), 1))
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    dist.all_reduce(lengths_t, op=dist.ReduceOp.MAX, group=group)
    pieces = [torch.tensor([c.num_batches, c.zeros_before_range], dtype=torch.int64, device=device) for c in collectors]
    for collector, mine, length in zip(collectors, rebinned, lengths_t.tolist()):
        if mine is None:
            continue
        counts = torch.zeros(length, dtype=torch.int64, device=device)
        counts[: mine.numel()] += mine
        counts[0] += collector.zeros_before_range  # zeros seen before this rank saw a non-zero value
        pieces.append(counts)
    flat = torch.cat(pieces)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    scalars = flat[: 2 * len(collectors)].view(-1, 2).tolist()
    merged = iter(flat[2 * len(collectors):].split([n for n, m in zip(lengths_t.tolist(), rebinned) if m is not None]))
    for collector, amax, width, mine, (num_batches, zeros) in zip(collectors, maxima.tolist(), widths, rebinned, scalars):
        home = collector.counts.device if collector.counts is not None else device
        if mine is None:  # every rank saw only zeros (or nothing)
            collector.replace_state(counts=None, bin_width=None, amax=amax, num_batches=num_batches, zeros=zeros)
            continue
        collector.replace_state(counts=next(merged).to(home).clone(), bin_width=width, amax=amax, num_batches=num_batches)
