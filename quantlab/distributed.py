"""torch.distributed support: process group from torchrun's environment, calibration
data sharded by batch, exact cross-rank statistics, identical ranges on every rank.

Used by PTQ (:func:`quantlab.ptq.run_ptq` merges the statistics when a process
group is up) and by QAT (:mod:`quantlab.qat`, re-exported as ``quantlab.qat.ddp``).

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
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from quantlab.api import amax_on_host
from quantlab.attach import iter_quantizers
from quantlab.calibrators import get_calibrator
from quantlab.scales import choose_amaxes
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


def choose_ranges(model: nn.Module, calibrators: Dict[str, Dict[str, Any]]) -> Tuple[Dict[str, Dict[str, float]], Dict[str, float]]:
    """Runs the calibrators with the work split over the ranks (collective).

    Call after :func:`all_reduce_statistics`: every rank holds the same
    histograms, so rank ``r`` chooses the ranges of input tensors ``r, r + N, ...``
    with every calibrator and one all-gather gives all ranks every range.

    Args:
        model: The quantized model holding the merged statistics.
        calibrators: Calibrator name -> its parameters.

    Returns:
        ``(ranges, seconds)``: ``ranges[calibrator][module]`` amax, and this
        rank's seconds per calibrator (its share, plus an equal part of the gather).
    """
    refs = [r for r in iter_quantizers(model) if r.role == "input" and r.quantizer.collector is not None
            and r.quantizer.collector.num_batches > 0]
    mine: Dict[Tuple[str, str], float] = {}
    seconds = dict.fromkeys(calibrators, 0.0)
    error: Optional[Exception] = None
    try:  # a failure here must reach the gather, or the other ranks would wait in it forever
        for name in calibrators:
            get_calibrator(name)  # an unknown name fails before any work
        share = refs[rank():: world_size()]
        stats = [ref.quantizer.collector.stats() for ref in share]
        bits = [ref.quantizer.spec.num_bits for ref in share]
        for name, params in calibrators.items():
            start = time.perf_counter()
            for ref, amax in zip(share, choose_amaxes(name, stats, bits, **params)):  # batched over this rank's share
                mine[(name, ref.module_name)] = amax
            seconds[name] += time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        error = exc
    start = time.perf_counter()
    parts = all_gather_object((_describe(error), mine))
    _raise_first_failure(error, [message for message, _ in parts], "choosing the ranges")
    ranges: Dict[str, Dict[str, float]] = {name: {} for name in calibrators}
    for _, part in parts:
        for (name, module), amax in part.items():
            ranges[name][module] = amax
    shared = (time.perf_counter() - start) / max(1, len(calibrators))
    return ranges, {name: t + shared for name, t in seconds.items()}


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


def raise_if_any_rank_failed(error: Optional[BaseException], what: str) -> None:
    """Collective: every rank reports whether its part of ``what`` failed, and all raise if one did.

    The failing rank raises its own error, the others :class:`RankFailedError`
    with its message, instead of waiting in the next collective until the
    process group times out. Outside a process group, raises ``error`` if given.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    _raise_first_failure(error, all_gather_object(_describe(error)), what)


def collect_statistics_across_ranks(model: nn.Module, loop: Any) -> Dict[str, int]:
    """``collect_statistics`` on this rank's shard, then the statistics merged exactly over the ranks.

    Collective. A failure on one rank (a NaN in its shard) is raised on every
    rank. Returns the number of batches each input tensor saw, over all ranks.
    """
    from quantlab.attach import collect_statistics

    error: Optional[Exception] = None
    try:
        collect_statistics(model, loop)
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank
        error = exc
    raise_if_any_rank_failed(error, "the statistics pass")
    all_reduce_statistics(model)
    return {r.module_name: r.quantizer.collector.num_batches for r in iter_quantizers(model)
            if r.role == "input" and r.quantizer.collector is not None}


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


class RangeMismatchError(RuntimeError):
    """The ranks of one job hold different ranges (amax) for the same quantizers."""


def check_ranges_agree(model: nn.Module) -> int:
    """Verifies that every rank holds bit-identical amax for every quantizer (collective).

    Ranges are all-reduced or broadcast, and learned ranges move with DDP's
    averaged gradients, so they should never differ; this check turns a silent
    divergence (a rank that skipped a collective, a non-deterministic kernel)
    into an error naming the quantizers.

    Returns:
        The number of quantizers compared (0 when not distributed).

    Raises:
        RangeMismatchError: naming up to five differing quantizers and the ranks.
    """
    if not is_distributed():
        return 0
    refs = list(iter_quantizers(unwrap(model)))
    mine = {r.key: amax.numpy().tobytes() for r, amax in zip(refs, amax_on_host([r.quantizer for r in refs]))}
    every = all_gather_object(mine)
    differing = []
    for key, value in mine.items():
        ranks = [r for r, theirs in enumerate(every) if theirs.get(key) != value]
        if ranks:
            differing.append(f"{key} (rank {rank()} vs rank(s) {ranks})")
    missing = sorted(set().union(*every) ^ set(mine))
    if differing or missing:
        shown = (differing + [f"{k} (missing on some ranks)" for k in missing])[:5]
        more = len(differing) + len(missing) - len(shown)
        raise RangeMismatchError("ranges differ across ranks: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else ""))
    return len(mine)


class _BatchShard:
    """Batch sampler over the batches ``b`` of a sequential loader with ``b % world_size == rank``."""

    def __init__(self, size: int, batch_size: int, drop_last: bool, rank: int, world_size: int, max_batches: Optional[int]) -> None:
        total = size // batch_size if drop_last else math.ceil(size / batch_size)
        if max_batches is not None:
            total = min(total, max_batches)
        self.size, self.batch_size = size, batch_size
        self.batches = range(rank, total, world_size)

    def __iter__(self) -> Iterator[List[int]]:
        for b in self.batches:
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.size)))

    def __len__(self) -> int:
        return len(self.batches)


class _EveryNth:
    """Batches ``rank, rank + world_size, ...`` of the first ``max_batches`` of ``data``
    (sized when ``data`` is, so the pass knows how many batches it will see)."""

    def __init__(self, data: Iterable[Any], rank: int, world_size: int, max_batches: Optional[int]) -> None:
        self.data, self.rank, self.world_size, self.max_batches = data, rank, world_size, max_batches

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.data):
            if self.max_batches is not None and index >= self.max_batches:
                return
            if index % self.world_size == self.rank:
                yield batch

    def __len__(self) -> int:
        total = len(self.data)  # type: ignore[arg-type]  # TypeError for unsized data, as len() gives
        if self.max_batches is not None:
            total = min(total, self.max_batches)
        return len(range(self.rank, total, self.world_size))


def shard_batches(data: Iterable[Any], rank: int, world_size: int, max_batches: Optional[int] = None) -> Iterable[Any]:
    """This rank's share of a job's calibration batches: batch ``b`` goes to rank ``b % world_size``.

    The ranks together see exactly the batches one process would (the first
    ``max_batches``), so merged statistics equal the one-process statistics bit
    for bit, provided every rank iterates ``data`` in the same order (a
    DataLoader that shuffles with the global random generator is refused). A sequential DataLoader over a sized dataset is re-batched by index
    (a rank loads only its own samples); any other iterable is walked on every
    rank and the other ranks' batches are skipped.

    Args:
        data: The whole job's batches (a DataLoader or any iterable), the same on every rank.
        rank: This process's rank.
        world_size: Number of processes.
        max_batches: Use only the first this many batches of ``data`` (all ranks together).
    """
    if world_size <= 1:
        return data if max_batches is None else _EveryNth(data, 0, 1, max_batches)
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler) and data.sampler.generator is None:
        raise ValueError(
            "the calibration DataLoader shuffles with the global random generator: every rank would draw "
            "another order and the shards would overlap; use shuffle=False or a generator seeded alike on all ranks"
        )
    if (
        isinstance(data, DataLoader)
        and data.batch_size is not None
        and isinstance(data.sampler, SequentialSampler)
        and not isinstance(data.dataset, IterableDataset)
    ):
        sampler = _BatchShard(len(data.dataset), data.batch_size, data.drop_last, rank, world_size, max_batches)
        options: Dict[str, Any] = {}
        if data.num_workers > 0:  # the worker options a DataLoader only takes with workers
            options = dict(prefetch_factor=data.prefetch_factor, persistent_workers=data.persistent_workers,
                           multiprocessing_context=data.multiprocessing_context)
        return DataLoader(
            data.dataset, batch_sampler=sampler, collate_fn=data.collate_fn, num_workers=data.num_workers,
            pin_memory=data.pin_memory, worker_init_fn=data.worker_init_fn, timeout=data.timeout,
            generator=data.generator, pin_memory_device=data.pin_memory_device, **options,
        )
    return _EveryNth(data, rank, world_size, max_batches)


def destroy() -> None:
    """Leaves the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
