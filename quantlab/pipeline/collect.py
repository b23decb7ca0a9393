"""The pipeline's ``collect`` stage: ONE statistics pass over the calibration data.

Every input quantizer gathers a running max and a histogram of |x|; weights and
activations stay in floating point during the pass, as in TensorRT's
calibration. With a process group, each rank runs the pass on its shard and the
statistics are merged exactly (:mod:`quantlab.histogram_merge`), so every rank
ends with the statistics one process would have built from all the data.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from quantlab import distributed
from quantlab.attach import QuantizerRef, iter_quantizers
from quantlab.pass_calls import pass_calls
from quantlab import cuda_graphs as graph_replay  # MIN_BATCHES read per pass: benchmarks set it
from quantlab.histogram_merge import merge_across_ranks
from quantlab.pipeline.types import PendingStatistics, Statistics
from quantlab.statistics import HistogramCollector, defer_flush, flush_all
from quantlab.tensor_quantizer import Role


def collect(model: nn.Module, forward_loop: Callable[[nn.Module], Any], *, group: Any = None,
            cuda_graphs: bool = True, defer: bool = False, refs: Optional[Sequence[QuantizerRef]] = None) -> Statistics:
    """Runs ``forward_loop(model)`` once with every input quantizer collecting statistics.

    Args:
        model: A model with quantizers attached.
        forward_loop: Calls the model on the calibration batches (this rank's
            shard under a process group).
        group: A process group (:func:`quantlab.distributed.world_group`): the
            call is then collective, a failure on one rank is raised on every
            rank, and the statistics are merged exactly across the ranks.
        cuda_graphs: On CUDA, replay repeated calls of ``model`` (same input
            shapes) as CUDA graphs, statistics included (:mod:`quantlab.cuda_graphs`;
            a call that cannot be captured runs eagerly). No effect on the CPU,
            nor when ``forward_loop.expected_batches`` (set by
            :func:`quantlab.batching.forward_loop` for sized data) is below
            ``MIN_BATCHES``: a capture costs more than so few replays save.
        defer: Leave the pass's end on the device where the statistics are there
            (no process group): nothing waits for the device here, and ``choose``
            enqueues the calibrators behind the pass, so their host work overlaps
            the pass's GPU work and the statistics come back with the first
            ranges (see :attr:`Statistics.pending`, :class:`~quantlab.pipeline.choose.ChoicesBehindThePass`).
            A NaN/Inf is then reported when the statistics are first read.
        refs: The model's quantizers, if the caller already listed them (each walk of a large
            model's module tree is host time before the first batch or after the last).

    Returns:
        The statistics of every input tensor.

    Raises:
        NonFiniteActivationError: a NaN/Inf reached a quantized layer (naming it).
    """
    start = time.perf_counter()
    error: Optional[BaseException] = None
    pending: Optional[PendingStatistics] = None
    refs = list(iter_quantizers(model)) if refs is None else list(refs)
    try:
        pending = _pass(model, refs, forward_loop, cuda_graphs, defer and group is None)
    except Exception as exc:  # noqa: BLE001 - under a group, re-raised on every rank below
        if group is None:
            raise
        error = exc
    if group is not None:
        distributed.raise_if_any_rank_failed(error, "the statistics pass", group)
        collectors = [_collector_of(ref.quantizer) for ref in refs if ref.role is Role.INPUT]
        merge_across_ranks(collectors, group, distributed.comm_device(group))
    statistics = statistics_of(model, pending, refs)
    statistics.seconds = time.perf_counter() - start
    return statistics


def _pass(model: nn.Module, refs: Sequence[QuantizerRef], forward_loop: Callable[[nn.Module], Any], cuda_graphs: bool,
          defer: bool = False) -> Optional[PendingStatistics]:
    expected = getattr(forward_loop, "expected_batches", None)
    if expected is not None and expected < graph_replay.MIN_BATCHES:
        cuda_graphs = False
    quantizers = [ref.quantizer for ref in refs]
    saved = [(q, q.mode) for q in quantizers]
    for q in quantizers:
        q.collect()  # inputs gather fresh statistics, weights stay in floating point
    # Every module in eval mode for the pass (model.eval() where a module overrides train()), then each
    # put back as it was (model.train(flag) would also flip submodules the caller set differently).
    modules = list(model.modules())
    training = [m for m in modules if m.training]
    if any(type(m).train is not nn.Module.train for m in modules):
        model.eval()
    else:  # what model.eval() does where no module overrides train(), without its walk per module
        for m in training:
            m.training = False
    try:
        # Weights stay in floating point: read directly, not through the (off) weight quantizers.
        with torch.no_grad(), pass_calls(model, refs), graph_replay.graphed_forward(model, enabled=cuda_graphs):
            forward_loop(model)
    finally:
        for m in training:
            m.training = True
        for q, mode in saved:
            if q.role is Role.WEIGHT:
                q.restore(mode)
            else:
                q.off()  # an input's range comes from the statistics, chosen next
    # On the GPU the statistics stay on the device during the pass; fold them in now (one
    # read-back for all tensors), which is also where a NaN/Inf seen on the way is reported;
    # or, deferred, stage them as one block on the device and read them back with the first ranges.
    inputs = [ref for ref in refs if ref.role is Role.INPUT and ref.quantizer.collector is not None]
    pending = defer_flush([ref.quantizer.collector for ref in inputs]) if defer else None
    if pending is None:
        flush_all([ref.quantizer.collector for ref in inputs])
        return None
    names = {id(ref.quantizer.collector): ref.module_name for ref in inputs}
    return PendingStatistics(pending, {names[id(c)]: c for c in pending.collectors})


def _collector_of(quantizer: Any) -> HistogramCollector:
    if quantizer.collector is None:  # a rank that never reached this layer still takes part in the merge
        quantizer.collector = HistogramCollector(quantizer.num_bins, name=quantizer.name)
    return quantizer.collector


def statistics_of(model: nn.Module, pending: Optional[PendingStatistics] = None,
                  refs: Optional[Sequence[QuantizerRef]] = None) -> Statistics:
    """The statistics the model's input quantizers hold (from the last pass or loaded scales).

    With ``pending`` (a deferred pass's end) the histograms of its collectors are
    left on the device, read when first needed. ``refs``: the model's quantizers, if
    the caller already listed them.
    """
    histograms: Dict[str, Any] = {}
    batches: Dict[str, int] = {}
    num_bits = 8
    for ref in iter_quantizers(model) if refs is None else refs:
        if ref.role is not Role.INPUT:
            continue
        num_bits = ref.quantizer.spec.num_bits
        collector = ref.quantizer.collector
        count = 0 if collector is None else collector.num_batches
        batches[ref.module_name] = count
        if count and (pending is None or ref.module_name not in pending.collectors):
            histograms[ref.module_name] = collector.stats()
    return Statistics(histograms=histograms, batches=batches, num_bits=num_bits, pending=pending)
