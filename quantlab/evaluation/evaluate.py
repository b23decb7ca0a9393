"""Running a task over eval batches: one model (or any callable), one precision."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from quantlab.batching import model_device, to_device
from quantlab.errors import QuantlabError
from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.tasks import Task, _describe, cast_floating


@dataclasses.dataclass
class Evaluation:
    """Metrics of one model on the eval batches.

    Attributes:
        metrics: Metric name -> value.
        seconds: Wall time of the forward passes and scoring.
        num_batches: Batches evaluated.
        state: The task state (kept so FP32 can become the reference).
    """

    metrics: Dict[str, float]
    seconds: float
    num_batches: int
    state: Dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)


def run_task(
    model: Callable[..., Any],
    task: Task,
    batches: Sequence[Any],
    *,
    input_dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[int], None]] = None,
    on_outputs: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> Evaluation:
    """Runs every batch through ``model`` and folds the outputs into a task state.

    Metrics are not computed yet (see :func:`evaluate`): the FP32 state may first
    have to become the task's reference.

    Args:
        model: An ``nn.Module`` (run in eval mode on its own device, without
            gradients) or any callable taking the same inputs (e.g. an ONNX
            Runtime runner).
        task: What to run and score.
        batches: The eval batches (the same list for every precision).
        input_dtype: Cast floating-point inputs to this dtype (FP16 models).
        device: Where inputs go for a non-module callable (default CPU).
        progress: Called with the number of batches done.
        on_outputs: Called with each batch's index and the task's output tensor
            (output fidelity against FP32: :mod:`quantlab.evaluation.fidelity`).

    Raises:
        EvaluationError: the model fails on a batch or its outputs do not fit the
            task; the message names the batch and the shapes.
    """
    if isinstance(model, nn.Module):
        model.eval()
        device = model_device(model)
    device = device or torch.device("cpu")
    if not batches:
        raise EvaluationError("the eval data is empty: no batch to evaluate")
    state = task.new_state()
    start = time.perf_counter()
    with torch.no_grad():
        for index, batch in enumerate(batches):
            batch = to_device(batch, device)
            inputs = task.inputs(batch)
            if input_dtype is not None:
                inputs = cast_floating(inputs, input_dtype)
            try:
                outputs = task.forward(model, inputs)
            except QuantlabError:
                raise
            except Exception as exc:  # noqa: BLE001 - any model failure becomes an error naming the batch
                raise EvaluationError(
                    f"the model failed on eval batch {index} (inputs {_describe(inputs)}): {type(exc).__name__}: {exc}"
                ) from exc
            task.update(state, outputs, batch, index)
            if on_outputs is not None:
                on_outputs(index, outputs)
            if progress is not None:
                progress(index + 1)
    return Evaluation(metrics={}, seconds=time.perf_counter() - start, num_batches=len(batches), state=state)


def evaluate(model: Callable[..., Any], task: Task, batches: Sequence[Any], **kwargs: Any) -> Evaluation:
    """:func:`run_task` followed by ``task.compute`` (the reference must already be set)."""
    evaluation = run_task(model, task, batches, **kwargs)
    start = time.perf_counter()
    evaluation.metrics = task.compute(evaluation.state)
    evaluation.seconds += time.perf_counter() - start
    return evaluation


def evaluate_reference(model: Callable[..., Any], task: Task, batches: Sequence[Any], **kwargs: Any) -> Evaluation:
    """Evaluates the FP32 model and makes its outputs the task's reference."""
    evaluation = run_task(model, task, batches, **kwargs)
    start = time.perf_counter()
    task.set_reference(evaluation.state)
    evaluation.metrics = task.compute(evaluation.state)
    evaluation.seconds += time.perf_counter() - start
    return evaluation
