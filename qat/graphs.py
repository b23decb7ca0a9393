"""A QAT model's forward and backward replayed as CUDA graphs.

Why: on a fast GPU a fake-quantized training step is bound by the host. Each
quantized weight adds a handful of small kernels and autograd nodes, and
Python enqueues them more slowly than the GPU runs them (ResNet-18 at batch
128 on an H200: 26-40 ms of host time for 27-33 ms of GPU work per step), so
the step time follows the host's speed and varies from step to step. Captured
once as CUDA graphs (``torch.cuda.make_graphed_callables``), the forward and
backward replay with one launch each, whatever the number of quantizers.

Usage, inside any training loop whose batches all have one shape::

    model = qat.prepare(model, data=calibration_batches)
    step_model = qat.graphed(model, sample_input)      # same parameters as model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    for x, y in loader:                                # drop_last=True: one shape
        optimizer.zero_grad(set_to_none=True)
        loss_fn(step_model(x), y).backward()
        optimizer.step()

Limits (those of CUDA graphs): every call has the sample's shapes, dtypes and
device; the forward makes no host-device synchronization and no data-dependent
Python decision (quantlab's quantizers make none once prepared); the quantizer
modes are those at capture time (graph again after changing them). The capture
runs ``warmup`` eager steps on a side stream first, which update BatchNorm's
running statistics like ordinary training steps.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

from quantlab.graph_capture import state_kept_on_failure
from quantlab.qat.errors import QATError


class _Step(nn.Module):
    """The wrapped model as one module (``make_graphed_callables`` refuses a module
    with forward hooks of its own, and quantlab hangs input quantizers on hooks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args)


def graphed(model: nn.Module, sample: Union[torch.Tensor, Sequence[torch.Tensor]], *, warmup: int = 3) -> nn.Module:
    """Captures ``model``'s training forward and backward as CUDA graphs.

    Args:
        model: A model in training mode on a CUDA device (prepared for QAT or not).
        sample: An input batch (or a tuple of positional inputs) with the shapes every
            later call will have.
        warmup: Eager steps run before the capture (they must include the first
            steps' lazy set-up).

    Returns:
        A module sharing ``model``'s parameters and buffers: call it in place of
        ``model`` for training steps; keep the optimizer on ``model.parameters()``.

    Raises:
        QATError: the model or the sample is not on a CUDA device, the model is in
            eval mode, or the sample requires grad.
    """
    args: Tuple[torch.Tensor, ...] = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise QATError("qat.graphed needs a sample batch of tensors (the inputs of one training step)")
    parameters = list(model.parameters())
    if not parameters:
        raise QATError("qat.graphed: the model has no parameters to train")
    device = parameters[0].device
    if device.type != "cuda":
        raise QATError(f"qat.graphed replays CUDA graphs: the model is on {device}, move it to a CUDA device first")
    if any(p.device != device for p in parameters):
        raise QATError("qat.graphed: the model's parameters are on several devices; CUDA graphs need one")
    if any(a.device != device for a in args):
        raise QATError(f"qat.graphed: the sample batch must be on the model's device ({device})")
    if any(a.requires_grad for a in args):
        raise QATError("qat.graphed: the sample batch must not require grad (it stands for data)")
    if not model.training:
        raise QATError("qat.graphed captures training steps: call model.train() first")
    if warmup < 1:
        raise QATError(f"qat.graphed: warmup must be >= 1 (got {warmup})")
    return capture(_Step(model), args, device, warmup=warmup)


def capture(step: nn.Module, args: Tuple[torch.Tensor, ...], device: torch.device, *, warmup: int = 3,
            allow_unused: bool = False) -> nn.Module:
    """``torch.cuda.make_graphed_callables(step, args)`` on ``device``; a failure leaves its RNG and stream as they were.

    Shared by :func:`graphed` and the built-in loop (:mod:`quantlab.qat.loop_graphs`).

    Args:
        step: The module to capture (without hooks of its own: wrap the model).
        args: Its positional sample tensors; they become the graph's input buffers.
        device: The CUDA device of the step.
        warmup: Eager forward+backward passes on a side stream before the capture.
        allow_unused: Parameters that the forward does not use get no gradient
            instead of failing the capture.

    Raises:
        Exception: whatever the capture raised (the device's RNG and current stream are as before it).
    """
    with torch.cuda.device(device), state_kept_on_failure(device):
        return torch.cuda.make_graphed_callables(step, args, num_warmup_iters=warmup, allow_unused_input=allow_unused)
