"""Distributed data parallel support: process group from torchrun's environment,
exact cross-rank calibration statistics, identical ranges on every rank.

Histogram widths are powers of two that depend only on the running max
(:mod:`quantlab.statistics`), so merging is exact: all-reduce MAX the running
maxima, let every rank re-bin its counts to the width of the common max, then
all-reduce SUM the counts. The merged histogram is bit-identical to the one a
single process would build from all shards.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from quantlab.attach import iter_quantizers
from quantlab.statistics import HistogramCollector, _merge_pairs, bin_width_for


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device: Optional[str] = None) -> DistInfo:
    """Joins the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` ...).

    Outside torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) does nothing. The
    backend is NCCL when the job runs on CUDA devices, gloo otherwise; with
    NCCL the current CUDA device becomes ``cuda:LOCAL_RANK``.

    Args:
        device: The device the job trains on ("cpu", "cuda", ...); default CUDA if available.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if size <= 1:
        return DistInfo(0, 1, local_rank, None)
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def default_device(info: DistInfo, requested: Optional[str] = None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under NCCL, else ``requested`` or CPU."""
    if info.backend == "nccl":
        return torch.device("cuda", info.local_rank)
    return torch.device(requested) if requested else torch.device("cpu")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_statistics(model: nn.Module) -> int:
    """Merges every input quantizer's histogram across ranks, exactly, in place.

    Collective: every rank must call it with the same model. Returns the number
    of collectors merged (0 when not distributed).
    """
    if not is_distributed():
        return 0
    refs = [r for r in iter_quantizers(model) if r.role == "input"]
    collectors: List[HistogramCollector] = []
    for ref in refs:
        if ref.quantizer.collector is None:
            ref.quantizer.collector = HistogramCollector(ref.quantizer.num_bins, name=ref.quantizer.name)
        collectors.append(ref.quantizer.collector)
    if not collectors:
        return 0
    device = _comm_device()
    # 1. The common running max (float64 holds the float32 maxima exactly).
    maxima = torch.tensor([c.amax for c in collectors], dtype=torch.float64, device=device)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    # 2. Every rank re-bins to the width of the common max; the longest result sets the
    #    length (as HistogramCollector.merge_ would), so the counts then add up exactly.
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
            mine = _merge_pairs(collector.counts.to(device), int(round(math.log2(width / collector.bin_width))))
        rebinned.append(mine)
        widths.append(width)
        lengths.append(max(mine.numel(), math.ceil(amax / width), 1))
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    dist.all_reduce(lengths_t, op=dist.ReduceOp.MAX)
    pieces = [torch.tensor([c.num_batches, c._pending_zeros], dtype=torch.int64, device=device) for c in collectors]
    for collector, mine, length in zip(collectors, rebinned, lengths_t.tolist()):
        if mine is None:
            continue
        counts = torch.zeros(length, dtype=torch.int64, device=device)
        counts[: mine.numel()] += mine
        counts[0] += collector._pending_zeros  # zeros seen before this rank saw a non-zero value
        pieces.append(counts)
    flat = torch.cat(pieces)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    scalars = flat[: 2 * len(collectors)].view(-1, 2).tolist()
    merged = iter(flat[2 * len(collectors) :].split([n for n, m in zip(lengths_t.tolist(), rebinned) if m is not None]))
    for collector, amax, width, mine, (num_batches, zeros) in zip(collectors, maxima.tolist(), widths, rebinned, scalars):
        home = collector.counts.device if collector.counts is not None else device
        collector.num_batches = int(num_batches)
        collector.amax = float(amax)
        if mine is None:  # every rank saw only zeros (or nothing)
            collector.counts, collector.bin_width, collector._pending_zeros = None, None, int(zeros)
            continue
        collector.counts = next(merged).to(home).clone()
        collector.bin_width = width
        collector._pending_zeros = 0
    return len(collectors)


def broadcast_ranges(model: nn.Module, src: int = 0) -> int:
    """Copies every quantizer's amax from rank ``src`` to all ranks (collective).

    Returns the number of quantizers broadcast (0 when not distributed).
    """
    if not is_distributed():
        return 0
    quantizers = [r.quantizer for r in iter_quantizers(model)]
    if not quantizers:
        return 0
    device = _comm_device()
    flat = torch.cat([q.amax.detach().reshape(-1).to(device, torch.float32) for q in quantizers])
    dist.broadcast(flat, src=src)
    modes = torch.tensor([list(type(q.mode)).index(q.mode) for q in quantizers], dtype=torch.int64, device=device)
    dist.broadcast(modes, src=src)
    offset = 0
    for q, mode_index in zip(quantizers, modes.tolist()):
        n = q.amax.numel()
        with torch.no_grad():
            q.amax.copy_(flat[offset : offset + n].reshape(q.amax.shape).to(q.amax.device))
        q.mode = list(type(q.mode))[mode_index]
        offset += n
    return len(quantizers)


def broadcast_buffers(model: nn.Module, src: int = 0) -> int:
    """Copies every floating-point and integer buffer (BatchNorm statistics, ranges) from rank ``src``.

    DDP broadcasts buffers at the start of each forward, so after the last step
    the ranks' BatchNorm statistics differ slightly; this makes them identical.
    """
    if not is_distributed():
        return 0
    device = _comm_device()
    buffers = [b for b in model.buffers() if b is not None]
    for buffer in buffers:
        staged = buffer.detach().to(device)
        dist.broadcast(staged, src=src)
        with torch.no_grad():
            buffer.copy_(staged.to(buffer.device))
    return len(buffers)


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (a one-element list outside DDP)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: List[float], device: Optional[torch.device] = None) -> List[float]:
    """Sums a few float64 numbers over ranks (identity outside DDP)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or _comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
