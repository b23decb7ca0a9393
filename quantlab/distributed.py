"""torch.distributed plumbing, communication only: the process group torchrun
describes, this rank's place in it, and the few collectives quantlab uses.

What is communicated lives with what it is about: the exact histogram merge
beside the collector (:mod:`quantlab.histogram_merge`), the split of the
calibrators' work in the pipeline's ``choose`` stage, data sharding with
batching (:func:`quantlab.batching.shard_batches`), the QAT range checks in
:mod:`quantlab.qat.ddp`. The PTQ pipeline takes a process group
(:func:`world_group`) and is then exact across ranks.
"""
from __future__ import annotations

import dataclasses
import gc
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn


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


def world_group() -> Any:
    """The process group of every rank when this process runs in one of several ranks, else None.

    Pass it as ``group`` to the pipeline's stages to make them collective.
    """
    return dist.group.WORLD if is_distributed() else None


def group_rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return dist.get_rank(group) if group is not None else 0


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 without a group)."""
    return dist.get_world_size(group) if group is not None else 1


def comm_device(group: Any = None) -> torch.device:
    """Where a collective's tensors live: this rank's CUDA device under NCCL, else the CPU."""
    backend = dist.get_backend(group) if group is not None else dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


class RankFailedError(RuntimeError):
    """Another rank failed in a step that every rank of the job takes together."""


def _describe(error: Optional[BaseException]) -> Optional[str]:
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_first_failure(error: Optional[BaseException], messages: List[Optional[str]], what: str) -> None:
    if error is not None:
        raise error
    for failed_rank, message in enumerate(messages):
        if message is not None:
            raise RankFailedError(f"{what} failed on rank {failed_rank}: {message}")


def raise_if_any_rank_failed(error: Optional[BaseException], what: str, group: Any = None) -> None:
    """Collective: every rank reports whether its part of ``what`` failed, and all raise if one did.

    The failing rank raises its own error, the others :class:`RankFailedError`
    with its message, instead of waiting in the next collective until the
    process group times out. Outside a process group, raises ``error`` if given.

    Args:
        error: This rank's failure, or None.
        what: The step, for the message.
        group: The process group (default: all ranks).
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    _raise_first_failure(error, all_gather_object(_describe(error), group), what)


def gather_results(error: Optional[BaseException], result: Any, what: str, group: Any = None) -> List[Any]:
    """Collective: every rank's ``result`` (rank order), or the first failure raised on every rank.

    One all-gather carries both, so a rank whose part failed never leaves the
    others waiting in a later collective.
    """
    parts = all_gather_object((_describe(error), result), group)
    _raise_first_failure(error, [message for message, _ in parts], what)
    return [part for _, part in parts]


def broadcast_buffers(model: nn.Module, src: int = 0) -> int:
    """Copies every floating-point and integer buffer (BatchNorm statistics, ranges) from rank ``src``.

    DDP broadcasts buffers at the start of each forward, so after the last step
    the ranks' BatchNorm statistics differ slightly; this makes them identical.
    """
    if not is_distributed():
        return 0
    device = comm_device()
    buffers = [b for b in model.buffers() if b is not None]
    for buffer in buffers:
        staged = buffer.detach().to(device)
        dist.broadcast(staged, src=src)
        with torch.no_grad():
            buffer.copy_(staged.to(buffer.device))
    return len(buffers)


def all_gather_object(obj: Any, group: Any = None) -> List[Any]:
    """Every rank's ``obj`` in rank order (a one-element list outside DDP); ``group`` default: all ranks."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_sum(values: List[float], device: Optional[torch.device] = None) -> List[float]:
    """Sums a few float64 numbers over ranks (identity outside DDP)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def destroy() -> None:
    """Leaves the process group, if this process joined one.

    Collects garbage first: a dropped DistributedDataParallel wrapper sits in reference
    cycles, and a reducer that outlives its process group aborts the process at exit
    ("terminate called without an active exception", torch 2.13 with gloo, about 1 exit in 4).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
