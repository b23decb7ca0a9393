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
# instantiation (~1 ms) and the graph's own device memory, and the GPU idles through it unless the host
# is ahead; replays save what the host spends per batch beyond the GPU's time. H200, ResNet-50, batches
# of 64, run_ptq, medians with graphs against eager (benchmarks/RESULTS.md, issue 18, 2026-12-03): 8
# batches lose on three hosts of four (97.7/105.1/96.3/95.5 against 98.9/95.6/94.9/94.4 ms); 16 batches
# graphed 196.4/181.1/178.0/194.4/177.1/184.1/194.1 against 196.7/180.9/179.6/182.4/178.8/182.2/194.5 ms
# eager on seven hosts (lower on four; the worst calls of slow hosts 217.5 against 277.3 ms), and with
# 6 ms of host time added per batch (a slower host) 188.5 against 209.2 ms. Capturing only where the GPU
# was seen waiting on the host (events after each call, a probe of the GPU's own time per call) cost
# more host time per call than it saved: 187.8 and 199.8 ms on two of those hosts.
MIN_BATCHES = 16
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
        # The graphs' memory pool and capture stream, made at the first capture, not before the pass's
        # first batch (while the GPU waits for it).
        self.pool: Any = None
        self.stream: Optional[torch.cuda.Stream] = None
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
        if self.stream is None:
            with torch.cuda.device(self.device):
                self.pool = torch.cuda.graph_pool_handle()
                self.stream = torch.cuda.Stream(self.device)
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


def _graphable_device(model: nn.Module) -> Optional[torch.device]:
    """The CUDA device holding all of ``model``'s parameters and buffers, or None: they are spread over
    several devices or off CUDA, or forward hooks other than quantlab's input hooks are registered
    (they would run only while capturing, not on replays).

    One walk of the module tree for both questions: it runs before the pass's first batch, while the
    GPU waits (for ResNet-50, two walks took ~1 ms on a 2-core EPYC, one takes 0.4 ms).
    """
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return None
    devices = set()
    for m in model.modules():
        if m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            return None
        if m._forward_pre_hooks and any(not is_input_hook(hook) for hook in m._forward_pre_hooks.values()):
            return None
        for tensors in (m._parameters, m._buffers):
            for t in tensors.values():
                if t is not None:
                    devices.add(t.device)
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
    device = _graphable_device(model) if enabled and torch.cuda.is_available() else None
    if device is None:
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
