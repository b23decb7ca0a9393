"""Feeding batches of any common shape to a model (tuples, dicts, tensors), and
sharding a job's batches over the ranks of a distributed run."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def split_batch(batch: Any) -> tuple:
    """Splits a batch into ``(model inputs, targets or None)``.

    ``(x, y)`` tuples give ``x`` and ``y``; a dict gives itself (keyword inputs,
    with ``labels`` left in); a tensor is the input.
    """
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("empty batch")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch, batch.get("labels")
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Calls the model with positional, keyword or single-tensor inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def main_tensor(output: Any, prefer: tuple = ("logits", "last_hidden_state")) -> Optional[torch.Tensor]:
    """The main tensor of a model output (tensor, HF ModelOutput, dict or tuple), or None."""
    if isinstance(output, torch.Tensor):
        return output
    for key in prefer:
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    return None


def forward_loop(
    data: Iterable[Any],
    *,
    max_batches: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Callable[[nn.Module], int]:
    """A ``forward_loop(model)`` that runs ``data`` through the model on its device.

    Args:
        data: An iterable of batches (e.g. a DataLoader).
        max_batches: Stop after this many batches.
        progress: Called with the number of batches done after each batch.

    Returns:
        A function that runs the loop and returns the number of batches it ran;
        its ``expected_batches`` attribute is the number it will run when
        ``data`` has a length (else None), which lets the statistics pass decide
        whether capturing CUDA graphs pays off.
    """

    def run(model: nn.Module) -> int:
        device = model_device(model)
        count = 0
        for batch in data:
            if max_batches is not None and count >= max_batches:
                break
            inputs, _ = split_batch(to_device(batch, device))
            call_model(model, inputs)
            count += 1
            if progress is not None:
                progress(count)
        return count

    try:
        expected: Optional[int] = len(data)  # type: ignore[arg-type]
    except TypeError:
        expected = None
    if expected is not None and max_batches is not None:
        expected = min(expected, max_batches)
    run.expected_batches = expected  # type: ignore[attr-defined]
    return run


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
