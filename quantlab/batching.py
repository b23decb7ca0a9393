"""Feeding batches of any common shape to a model (tuples, dicts, tensors)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn


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
