"""CUDA-graph replay of a model's forward during the statistics pass.

With the fused statistics kernel, a ResNet-50's statistics pass on an H100 is
bound by the host: per batch, every quantized layer costs a hook, a collector
call and a kernel launch (tens of microseconds of Python each) on top of the
eager forward's own launches. Replaying the whole forward, hooks and statistics
kernels included, as one CUDA graph leaves only the GPU work.

How: while :func:`graphed_forward` is active, ``model.forward`` (an instance
attribute, removed afterwards; nothing is patched globally) runs the first
call of each input signature (shapes, dtypes, devices and the non-tensor
arguments) and the next few (``EAGER_CALLS`` in all) eagerly, captures the one
after into a graph and replays it from then on, copying the inputs into the
graph's own input buffers and returning clones of its outputs. The statistics
accumulators refuse to be captured unless their state already exists on the
device (see ``quantlab.statistics.capturing``); on any failure to capture (a host
sync in the forward, data-dependent shapes, a layer seen for the first time),
that signature stays eager. Python code inside the forward does not run on
replay: the statistics counters are advanced by the recorded amounts instead.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantlab import statistics
from quantlab.attach import is_input_hook
from quantlab.graph_capture import state_kept_on_failure

_LOG = logging.getLogger(__name__)


# Input signatures captured per pass at most (each graph holds its own input buffers).
MAX_GRAPHS = 4
# Passes known to be shorter run eagerly: a capture costs about one eager forward of host time plus
# instantiation and the graph's own device memory (new segments per pass), and replays save what the
# host spends per batch beyond the GPU's time, little once the pass is GPU-bound. H200, ResNet-50,
# batches of 64, run_ptq (benchmarks/RESULTS.md, issue 18, 2026-12-03): with the capture at the 4th
# call and no wait for the device, 16 batches took 177.8-187.5 ms graphed (median 178.5) against
# 178.9-181.8 ms eager on one host, but 178-262 ms (median 200-205) on another, where the capture's
# cost varied from run to run; 8 batches lose (median 105 against 99 ms). Earlier: 32 batches 1.16x
# FP32 graphed against 1.21-1.33x eager. So only passes of 32 batches or more are graphed.
MIN_BATCHES = 32
# Calls of a signature run eagerly before the next one is captured. The first warms up the allocator,
# cuDNN/cuBLAS plans and the statistics state; the others let the host get ahead of the GPU (a pass
# is GPU-bound), so the capture's host time (the Python forward in capture mode plus instantiation)
# overlaps GPU work already queued instead of leaving the GPU idle.
EAGER_CALLS = 3


def _signature(args: tuple, kwargs: dict, device: torch.device) -> Tuple[Optional[Hashable], List[Any]]:
    """A hashable key of the call (tensors by shape, dtype and strides; the grad and autocast modes)
    and the call's flattened leaves; the key is None if the call is not graphable (a tensor on
    another device, one that requires grad, an unhashable value)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key: List[Hashable] = [str(spec), torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"),
                           torch.get_autocast_dtype("cuda")]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device != device or leaf.requires_grad:
                return None, leaves
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None, leaves
            key.append(("value", type(leaf), leaf))
    return tuple(key), leaves


class _Graph:
    """One captured call: its input buffers, graph, outputs and statistics bookkeeping."""

    def __init__(self, inputs: List[torch.Tensor], graph: "torch.cuda.CUDAGraph", outputs: Any,
                 recorded: List[Tuple[Any, int]]) -> None:
        self.inputs = inputs
        self.graph = graph
        self.outputs = outputs
        self.recorded = recorded

    def replay(self, leaves: List[Any]) -> Any:
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        for buffer, value in zip(self.inputs, tensors):
            buffer.copy_(value)
        self.graph.replay()
        statistics.advance(self.recorded)
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.outputs)


class GraphedForward:
    """Callable that replaces ``model.forward`` while the statistics pass runs (see module doc)."""

    def __init__(self, forward: Callable[..., Any], device: torch.device) -> None:
        self.forward = forward
        self.device = device
        self.seen: Dict[Hashable, int] = {}
        self.graphs: Dict[Hashable, Optional[_Graph]] = {}  # None: capture failed, stays eager
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)
        self.epoch = statistics.epoch()
        self.replays = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if statistics.epoch() != self.epoch:  # statistics were read mid-pass: the graphs' state is gone
            self.graphs.clear()
            self.seen.clear()
            self.epoch = statistics.epoch()
        key, leaves = _signature(args, kwargs, self.device)
        if key is None or (key not in self.graphs and len(self.graphs) >= MAX_GRAPHS):
            return self.forward(*args, **kwargs)
        if key in self.graphs:
            graph = self.graphs[key]
            if graph is None:
                return self.forward(*args, **kwargs)
            self.replays += 1
            return graph.replay(leaves)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= EAGER_CALLS:  # warm-up (allocator, plans, statistics state), then a lead on the GPU
            return self.forward(*args, **kwargs)
        graph = self._capture(args, kwargs)
        self.graphs[key] = graph
        if graph is None:
            return self.forward(*args, **kwargs)
        self.replays += 1
        return graph.replay(leaves)

    def _capture(self, args: tuple, kwargs: dict) -> Optional[_Graph]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        inputs = [leaf.clone() for leaf in leaves if isinstance(leaf, torch.Tensor)]
        it = iter(inputs)
        static_args, static_kwargs = pytree.tree_unflatten(
            [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)
        graph = torch.cuda.CUDAGraph()
        # The capture stream follows the work queued so far (the inputs' copies among it); no wait for the
        # device, which keeps running the eager calls queued before while the host captures.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            # capture_begin/end directly: torch.cuda.graph() would first run gc.collect() and
            # empty_cache(), a cost per capture that a pass of a few batches does not repay.
            with (torch.cuda.device(self.device), state_kept_on_failure(self.device), statistics.capturing() as recorded,
                  torch.cuda.stream(self.stream)):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    outputs = self.forward(*static_args, **static_kwargs)
                finally:
                    graph.capture_end()
        except Exception as error:  # a sync, a new layer, data-dependent shapes: stay eager
            _LOG.info("statistics pass: forward not captured as a CUDA graph (%s); running it eagerly", error)
            torch.cuda.synchronize(self.device)
            return None
        if statistics.epoch() != self.epoch:  # the forward read statistics while being captured
            return None
        return _Graph(inputs, graph, outputs, recorded)


def _foreign_hooks(model: nn.Module) -> bool:
    """Whether forward hooks other than quantlab's input hooks are registered (they would run only
    while capturing, not on replays)."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    for m in model.modules():
        if m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        if any(not is_input_hook(hook) for hook in m._forward_pre_hooks.values()):
            return True
    return False


def _single_cuda_device(model: nn.Module) -> Optional[torch.device]:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) != 1:
        return None
    (device,) = devices
    return device if device.type == "cuda" else None


@contextlib.contextmanager
def graphed_forward(model: nn.Module, enabled: bool = True) -> Iterator[Optional[GraphedForward]]:
    """Replays ``model``'s forward as CUDA graphs inside the block.

    A no-op (yields None) if disabled, off CUDA, for a model spread over several
    devices, or with forward hooks of its own (they would not run on replays).
    """
    device = _single_cuda_device(model) if enabled and torch.cuda.is_available() else None
    if device is None or _foreign_hooks(model):
        yield None
        return
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    graphed = GraphedForward(model.forward, device)
    model.forward = graphed  # an instance attribute: only this model, only inside the block
    try:
        yield graphed
    finally:
        if had_own:
            model.forward = previous
        else:
            del model.forward
        graphed.graphs.clear()  # frees the graphs and their memory pool
