"""One-pass activation statistics: running max of |x| and a histogram of |x|.

The histogram follows TensorRT's reference in using equal-width bins that are
appended as the range grows, with one deliberate difference: the bin width is
snapped to a power of two that depends only on the running max. Then

* the bin of every value (``ceil(|x| / width) - 1``) is computed exactly in
  floating point,
* the counts do not depend on the order of batches or on how data is sharded
  across ranks (so distributed statistics merge bit-identically), and
* memory stays bounded: when the range doubles, adjacent bins merge in pairs,
  keeping between ``num_bins`` and ``2 * num_bins`` bins.

Bins are right-closed: bin ``k`` holds ``(k * width, (k + 1) * width]`` and bin 0
also holds exact zeros, so the running max always falls in the last bin.

Two ways to add a batch, with identical counts:

* host path (CPU tensors): the batch max is read back and the histogram grows
  on demand; a read-back costs nothing on the CPU.
* device path (CUDA tensors, see :class:`_DeviceAccumulator`): the running max,
  the bin width's exponent and a fixed ``2 * num_bins`` histogram stay on the
  GPU and every step is a kernel, so :meth:`HistogramCollector.update` never
  waits for the GPU. A read-back per tensor per batch used to stall the GPU
  once per quantized layer and made the pass host-bound (benchmarks/RESULTS.md).
  The device state is folded into the host-side histogram, with one read-back,
  when the statistics are read; a NaN/Inf seen on the way is reported then.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from quantlab.calibrators import HistogramBlock, HistogramStats
from quantlab.errors import NonFiniteActivationError
from quantlab.kernels import histogram_cpu, histogram_cuda


def bin_width_for(amax: float, num_bins: int) -> float:
    """Smallest power of two ``w`` with ``amax / w <= 2 * num_bins``."""
    target = amax / (2 * num_bins)
    mantissa, exponent = math.frexp(target)  # target = mantissa * 2**exponent, mantissa in [0.5, 1)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


# On CUDA, exact zeros are counted in this many separate slots (see _count_slots).
_ZERO_LANES = 32


def _count_slots(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``torch.bincount(slots, minlength=num_slots)`` for a flat int tensor with values < num_slots.

    After a ReLU about half of the values are exact zeros, all in slot 0. On the
    GPU their atomic increments of one counter serialize (bincount ran at ~50
    GB/s, three quarters of the statistics pass of a ResNet-50). Giving each of
    32 neighbouring elements its own zero slot removes that hot spot; the spare
    slots are summed back into slot 0, so the counts are identical.
    """
    if slots.is_cuda and slots.numel() % _ZERO_LANES == 0:
        lanes = torch.arange(num_slots, num_slots + _ZERO_LANES, dtype=slots.dtype, device=slots.device)
        grouped = slots.view(-1, _ZERO_LANES)
        spread = torch.where(grouped == 0, lanes, grouped).view(-1)
        counts = torch.bincount(spread, minlength=num_slots + _ZERO_LANES)
        out = counts[:num_slots].clone()
        out[0] += counts[num_slots:].sum()
        return out
    return torch.bincount(slots, minlength=num_slots)


def merge_pairs(counts: torch.Tensor, times: int) -> torch.Tensor:
    """Re-bins ``counts`` to ``2**times`` times the bin width (adjacent bins summed in pairs, ``times`` times)."""
    for _ in range(times):
        if counts.numel() % 2:
            counts = torch.cat([counts, counts.new_zeros(1)])
        counts = counts.view(-1, 2).sum(dim=1)
    return counts


# torch.histc counts in float32, exact while no bin exceeds 2**24 per call.
_HISTC_CHUNK = 1 << 24
# The bin-width exponent is kept where 2**-exponent is a normal float32.
_MIN_EXPONENT, _MAX_EXPONENT = -126, 126
# The fused kernels take int element counts: larger batches go in chunks of this many.
_KERNEL_CHUNK = 1 << 30
# QUANTLAB_FUSED_STATISTICS=0 keeps the torch ops on both paths (for comparison and as an escape hatch).
FUSED_KERNELS = os.environ.get("QUANTLAB_FUSED_STATISTICS", "1") != "0"
# A tensor that feeds several quantized layers is counted once per batch and copied to the others
# (see _counted); QUANTLAB_COPY_SHARED_INPUTS=0 counts it for every layer (benchmarks compare both).
COPY_SHARED_INPUTS = os.environ.get("QUANTLAB_COPY_SHARED_INPUTS", "1") != "0"


class NotCapturable(RuntimeError):
    """A statistics update that cannot be recorded into a CUDA graph (it would allocate or read back)."""


# While this thread captures a CUDA graph (quantlab.cuda_graphs): the (accumulator, elements) of
# every update. Per thread, as the capture itself is (capture_error_mode="thread_local").
class _CaptureState(threading.local):
    recorded: Optional[List[Tuple["_DeviceAccumulator", int]]] = None  # a class default: read per layer per batch


_CAPTURE = _CaptureState()
# Advanced whenever an accumulator that a graph writes into is read and recycled: graphs captured
# before must not be replayed after (quantlab.cuda_graphs checks it).
_EPOCH = [0]


def _recording() -> Optional[List[Tuple["_DeviceAccumulator", int]]]:
    return _CAPTURE.recorded


def epoch() -> int:
    """Changes when a graph's statistics state was read mid-pass (its graphs are then stale)."""
    return _EPOCH[0]


@contextlib.contextmanager
def capturing() -> Iterator[List[Tuple["_DeviceAccumulator", int]]]:
    """Records the statistics updates made while this thread captures a CUDA graph.

    Captured work does not run, so the host-side counters that the updates
    advanced are put back on exit; :func:`advance` applies them once per replay.
    An update that cannot be captured raises :class:`NotCapturable`.
    """
    recorded: List[Tuple["_DeviceAccumulator", int]] = []
    _CAPTURE.recorded = recorded
    try:
        yield recorded
    finally:
        _CAPTURE.recorded = None
        for accumulator, elements in recorded:
            accumulator.batches -= 1
            accumulator.elements -= elements


# Per thread, the accumulator that counted each tensor last: (weak references to the tensor and to
# the accumulator, the tensor's version then, the accumulator's batch count and generation after it). A tensor that feeds several quantized
# layers (a residual block's input into its first convolution and the shortcut; a transformer's
# hidden states into Q, K and V) is then read once per batch: the other layers copy the counts.
class _CountedTable(threading.local):
    def __init__(self) -> None:  # runs once in each thread that uses it
        self.table: Dict[int, Tuple[Any, int, Any, int, int]] = {}


_COUNTED = _CountedTable()
_COUNTED_LIMIT = 4096  # entries kept before the dead ones are dropped


def _counted() -> Dict[int, Tuple[Any, int, Any, int, int]]:
    return _COUNTED.table


def _capturing_on(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def advance(recorded: List[Tuple["_DeviceAccumulator", int]]) -> None:
    """Counts one replay of a captured graph's statistics updates."""
    for accumulator, elements in recorded:
        accumulator.batches += 1
        accumulator.elements += elements


class _DeviceAccumulator:
    """Sync-free statistics of one tensor on its device (same bins as the host path).

    State on the device: ``amax`` (running max of |x|; a NaN/Inf propagates into
    it and is reported by :meth:`read`), ``exponent`` (bin width ``2**exponent``,
    the host path's width for that max) and ``counts`` (``2 * num_bins`` bins as
    float64, exact to 2**53; the host path keeps the first ``ceil(amax / width)``).
    On the host: the number of elements seen, so exact zeros need no counting:
    they are the elements the histogram did not count, added to bin 0 by :meth:`read`.

    Per batch, on float32/16 and bfloat16 CUDA tensors with the default bins,
    one fused kernel (:mod:`quantlab.kernels.histogram_cuda`: max, counting and
    range update in one read of ``x``; a second launch for a tensor's first
    batch). Otherwise, and where that cannot be compiled, the same arithmetic
    in torch ops follows.

    Torch ops: about 20 kernel launches and nothing read back: ``a = |x|``; its
    max updates the range; when the width grows by ``2**k`` the old counts move to
    bin ``i >> k`` (an index_add, the device form of merging pairs ``k`` times);
    then ``ceil(a / width)`` is counted by ``torch.histc`` over
    ``[1, 2 * num_bins + 1]``, which puts slot ``s`` in bin ``s - 1`` exactly
    (integer arithmetic in float) and skips zeros, NaN and Inf. Skipping the
    post-ReLU half of a tensor also spares its atomic updates. Launches matter:
    on a GPU host each costs 20-50 us of CPU, and the pass runs once per
    quantized layer per batch.
    """

    def __init__(self, num_bins: int, x: torch.Tensor) -> None:
        self.size = 2 * num_bins
        self.device = device = x.device
        self.device_index = x.get_device()  # -1 on the CPU
        # amax / size must round like the host path's float64 division: exact in float32 when
        # size is a power of two and the data is at most float32.
        power_of_two = num_bins & (num_bins - 1) == 0
        exact32 = power_of_two and x.dtype != torch.float64
        # One buffer holds the whole state (amax at byte 0, exponent at byte 8, counts from byte 16),
        # so a layer that copies another's state (a shared input, see _same_as) does it in one copy.
        self.state = torch.zeros(16 + 8 * self.size, dtype=torch.uint8, device=device)
        amax_dtype = torch.float32 if exact32 else torch.float64
        self.amax = self.state[: amax_dtype.itemsize].view(amax_dtype)[0]
        # log2(size) when size is a power of two: the exponent then comes from amax alone.
        self.size_log2 = self.size.bit_length() - 1 if power_of_two else None
        # Below any real exponent: until the first non-zero value the histogram is empty (zeros
        # are counted at read time), so whatever the first shift does is harmless.
        self.exponent = self.state[8:12].view(torch.int32)[0]
        self.exponent.fill_(_MIN_EXPONENT)
        self.counts = self.state[16:].view(torch.float64)
        self._index: Optional[torch.Tensor] = None  # bin numbers, for the torch ops' re-binning
        self._zero = torch.zeros((), dtype=self.amax.dtype, device=device)
        self.batches = 0
        self.elements = 0
        self._stale = False  # reset() was called: clear the device state before the next batch
        # (accumulator, its generation) whose state this one copied at its latest batch
        self.mirror_of: Optional[Tuple["_DeviceAccumulator", int]] = None
        self.generation = 0  # advanced by reset(): the state starts another history
        self.in_graph = False  # a captured CUDA graph writes into this state
        self._weak_self = weakref.ref(self)  # what the shared-input table holds (made once, not per batch)
        # The fused kernels (quantlab.kernels.histogram_cuda) where they apply: one read per batch.
        # Both paths update amax, exponent and counts in place, so batches may take either.
        self._kernels = self._fused_kernels()

    def _fused_kernels(self) -> Optional[histogram_cuda.FusedHistogram]:
        """The fused kernels' launcher bound to this state (None where they do not apply)."""
        exact32 = self.amax.dtype == torch.float32
        if not (FUSED_KERNELS and exact32 and self.counts.is_cuda and self.size <= histogram_cuda.MAX_BINS):
            return None
        compiled = histogram_cuda.kernels_for(self.counts.device)
        if compiled is None:
            return None
        return histogram_cuda.FusedHistogram(
            compiled, self.amax, self.exponent, self.counts, self.size_log2, _MIN_EXPONENT, _MAX_EXPONENT)

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_DeviceAccumulator":
        """A copy of the statistics state (still on the device, nothing read back) with launchers of its own.

        The fused kernels' launcher holds ctypes pointers to this state's tensors, which
        ``copy.deepcopy`` refuses (and which would point at the original's tensors anyway):
        the copy gets a launcher bound to its own tensors (the kernels' per-batch scratch
        is empty between batches), no cached bin index, and no captured CUDA graph writes
        into it. The pending batches (and a NaN/Inf among them) stay pending in both.
        """
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            if key not in ("_kernels", "_index", "mirror_of", "_weak_self"):
                copied.__dict__[key] = copy.deepcopy(value, memo)
        copied._weak_self = weakref.ref(copied)  # deepcopy keeps a weak reference as it is: the original's
        copied._index = None
        copied.mirror_of = None
        copied.in_graph = False
        copied._kernels = copied._fused_kernels() if self._kernels is not None else None
        return copied

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether ``x`` can be added here: same device, and float64 only into a float64 range."""
        # Device indices, not torch.device objects: this runs per layer per batch.
        return x.get_device() == self.device_index and (x.dtype is not torch.float64 or self.amax.dtype is torch.float64)

    def reset(self) -> None:
        """Marks the state empty, for the next pass (reusing it saves ~0.5 ms of host time).

        The device state is cleared by the next batch: by the fused kernels' first
        launch, or by three torch ops.
        """
        self.batches = self.elements = 0
        self._stale = True
        self.mirror_of = None
        self.generation += 1  # whoever copied this state before copied another history

    def update(self, x: torch.Tensor, elements: Optional[int] = None) -> None:
        """Adds one batch (``elements``: ``x.numel()``, if the caller has it).

        This runs per quantized layer per batch, and a host-bound pass pays for each of its
        Python-level steps: the common batch (not captured, the fused kernel on the current
        device) takes one straight path to the launch, without helper calls or torch.device objects.
        """
        recording = _CAPTURE.recorded
        n = x.numel() if elements is None else elements
        # Never shared: an inference tensor (no version counter, so an in-place change could not be
        # seen), nor inside a CUDA graph capture (a replay would copy whether or not the two states
        # are still equal then: another call between replays may have fed only one of the layers).
        table = _COUNTED.table if COPY_SHARED_INPUTS and recording is None and not x.is_inference() else None
        if table is not None:
            entry = table.get(id(x))
            source = None if entry is None else self._same_as(x, entry)
            if source is not None:  # this very batch was just counted into an equal state: copy the result
                self.state.copy_(source.state)
                self._finish(n, None)
                self.mirror_of = (source, source.generation)
                return
        kernels = self._kernels
        address = None if kernels is None else histogram_cuda.readable_address(x)  # None: not the fused kernel
        if recording is not None:  # only the fused kernel on an existing state, on the captured device
            if address is None or self.batches == 0 or n >= _KERNEL_CHUNK or not _capturing_on(x.device):
                raise NotCapturable("statistics update not capturable (first batch, other device, or not the fused kernel)")
        if address is not None and n < _KERNEL_CHUNK:  # the fused kernel (it clears a stale state itself)
            index = x.get_device()
            if index == histogram_cuda.current_index():
                kernels.enqueue(address, n, histogram_cuda.KIND_OF[x.dtype], self.batches == 0, index)
            else:
                kernels.update(x, self.batches == 0, n)  # switches to the data's device
        elif address is not None:
            # Chunks of one batch are exact as separate batches: the final counts at the final width
            # do not depend on how the values were grouped.
            for i, chunk in enumerate(x.view(-1).split(_KERNEL_CHUNK)):
                kernels.update(chunk, first=self.batches == 0 and i == 0)
        else:
            if self._stale:
                self.counts.zero_()
                self.amax.zero_()
                self.exponent.fill_(_MIN_EXPONENT)
            self._update_torch_ops(x)
        self._finish(n, recording)
        self.mirror_of = None
        if table is None:
            return
        if len(table) >= _COUNTED_LIMIT:  # drop the dead; if most are alive, start over (sharing is only a saving)
            for key in [k for k, entry in table.items() if entry[0]() is None or entry[2]() is None]:
                del table[key]
            if len(table) >= _COUNTED_LIMIT // 2:
                table.clear()
        table[id(x)] = (weakref.ref(x), x._version, self._weak_self, self.batches, self.generation)

    def _finish(self, elements: int, recording: Optional[List[Tuple["_DeviceAccumulator", int]]]) -> None:
        self._stale = False
        self.batches += 1
        self.elements += elements
        if recording is not None:  # after the launch: a failed one leaves nothing to take back
            self.in_graph = True
            recording.append((self, elements))

    def _same_as(self, x: torch.Tensor, entry: Optional[Tuple[Any, int, Any, int, int]]) -> Optional["_DeviceAccumulator"]:
        """The accumulator whose state equals what this one's would be after counting ``x``, if any.

        That is another accumulator whose latest batch was this same tensor object, unchanged
        since (the same version), and whose state before that batch equalled this one's: both
        were empty, or this one has copied that one's state at every batch since. Only then is
        copying exact; in any other case (another tensor, an in-place change, a layer that
        diverged once, a state emptied by a read since) the batch is counted here.
        """
        if entry is None:
            return None
        ref, version, source_ref, batches, generation = entry
        source = source_ref()
        if (source is None or source is self or ref() is not x or x._version != version
                or source.batches != batches or source.generation != generation):
            return None
        if source.size != self.size or source.amax.dtype != self.amax.dtype or source.state.device != self.state.device:
            return None
        if self.batches == 0 and batches == 1:
            return source
        return source if self.mirror_of == (source, generation) and self.batches == batches - 1 else None

    def _update_torch_ops(self, x: torch.Tensor) -> None:
        # Half precision cannot hold |x| / width exactly: count in float32 (float64 stays).
        a = x.abs() if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32).abs_()
        amax = torch.maximum(self.amax, a.amax().to(self.amax.dtype))
        # The smallest e with amax / size <= 2**e is the frexp exponent of the float just below
        # amax / size (exact: no rounding anywhere), minus log2(size) when that is an integer.
        if self.size_log2 is not None:
            exponent = torch.frexp(torch.nextafter(amax, self._zero)).exponent.sub_(self.size_log2)
        else:
            exponent = torch.frexp(torch.nextafter(amax / self.size, self._zero)).exponent
        # A max of 0 keeps the exponent (as the fused kernels do), so it never decreases.
        exponent = torch.where(amax == 0, self.exponent, exponent.clamp_(_MIN_EXPONENT, _MAX_EXPONENT))
        shift = (exponent - self.exponent).clamp_(0, 62)
        if self._index is None:
            self._index = torch.arange(self.size, dtype=torch.int64, device=self.counts.device)
        self.counts.copy_(torch.zeros_like(self.counts).index_add_(0, self._index >> shift, self.counts))
        self.amax.copy_(amax)
        self.exponent.copy_(exponent)
        # 2**-exponent from its bit pattern: exact, unlike pow/exp2 on some devices.
        scale = ((127 - exponent) << 23).view(torch.float32)
        slots = a.mul_(scale if a.dtype == torch.float32 else scale.to(a.dtype)).ceil_().reshape(-1)
        for chunk in slots.split(_HISTC_CHUNK):  # 0 for zeros, else 1 + the value's bin
            self.counts += torch.histc(chunk, bins=self.size, min=1.0, max=float(self.size + 1))

    def read(self, scalars: "Optional[Sequence[float]]" = None,
             counts: Optional[torch.Tensor] = None) -> "tuple[float, float, torch.Tensor]":
        """``(amax, bin width, int64 counts trimmed to the host path's length)``: one read-back.

        Args:
            scalars, counts: This state's ``(amax, exponent, sum of counts)`` and converted
                counts, already read back with those of other tensors (:func:`read_many`);
                else read here.

        Raises:
            ValueError: the running max is NaN or Inf (a non-finite value was seen).
        """
        if scalars is None or counts is None:
            [scalars], [counts] = read_many([self])
        amax, exponent = scalars[0], scalars[1]
        if not math.isfinite(amax):
            raise ValueError("non-finite")
        width = math.ldexp(1.0, int(exponent))
        needed = max(1, math.ceil(amax / width))
        return amax, width, counts[:needed]


def read_many(accumulators: "Sequence[_DeviceAccumulator]") -> "tuple[List[List[float]], List[torch.Tensor]]":
    """``(amax, exponent, sum of counts)`` of many accumulators on one device, and their counts as
    int64 with the zeros in bin 0 (the elements the histogram did not count): ONE read-back and,
    where every state has the same bins (the usual case), a dozen ops for a whole model instead of
    a few per tensor (each costs 10-50 us of a GPU host's time)."""
    if not accumulators:
        return [], []
    staged = _stage(accumulators)
    if staged is not None:
        scalars, ints = staged
        return scalars.tolist(), list(ints.unbind(0))
    scalars = _scalars(accumulators).tolist()  # bins differ: one tensor at a time
    rows = [a.counts.to(torch.int64) for a in accumulators]
    for row, a, values in zip(rows, accumulators, scalars):
        row[0] += a.elements - int(values[2])
    return scalars, rows


def _scalars(accumulators: "Sequence[_DeviceAccumulator]", block: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[n, 3]`` float64 on the device: each state's amax, exponent and sum of counts."""
    if len({a.amax.dtype for a in accumulators}) == 1:
        amax = torch.stack([a.amax for a in accumulators]).double()
    else:
        amax = torch.stack([a.amax.double() for a in accumulators])
    exponent = torch.stack([a.exponent for a in accumulators]).double()
    counted = block.sum(dim=1) if block is not None else torch.stack([a.counts.sum() for a in accumulators])
    return torch.stack([amax, exponent, counted], dim=1)


def _stage(accumulators: "Sequence[_DeviceAccumulator]") -> "Optional[tuple[torch.Tensor, torch.Tensor]]":
    """States of the same bins as ``(scalars [n, 3] float64, counts [n, bins] int64 with the zeros in
    bin 0)`` on their device, nothing read back; None where the bins differ."""
    if len({a.counts.numel() for a in accumulators}) != 1:
        return None
    block = torch.stack([a.counts for a in accumulators])
    scalars = _scalars(accumulators, block)
    ints = block.to(torch.int64)
    elements = torch.tensor([a.elements for a in accumulators], dtype=torch.int64).to(ints.device, non_blocking=True)
    # The zeros: what the histogram did not count (int() of the exact float64 sum, as on the host).
    ints[:, 0] += elements - scalars[:, 2].to(torch.int64)
    return scalars, ints


class PendingFlush:
    """The end of a pass, enqueued: every collector's device state as one block, read back later.

    :func:`defer_flush` builds it with device work only, so the calibrators' block
    forms can be enqueued behind the pass before anything waits for the device;
    :meth:`complete` then flushes every collector from the one read-back of
    :attr:`scalars` (with whatever else the caller read in the same copy).

    Attributes:
        collectors: The collectors, row by row.
        scalars: ``[rows, 3]`` float64 on the device: amax, exponent, sum of counts.
        block: The counts as a :class:`~quantlab.calibrators.HistogramBlock` (the rows' sizes
            on the device, computed as :meth:`_DeviceAccumulator.read` computes them).
    """

    def __init__(self, collectors: "Sequence[HistogramCollector]", accumulators: "Sequence[_DeviceAccumulator]",
                 scalars: torch.Tensor, ints: torch.Tensor) -> None:
        self.collectors = list(collectors)
        self._states = [(a, a.generation, a.batches) for a in accumulators]
        self.scalars = scalars
        self._ints = ints
        width = ints.shape[1]
        # bin width 2**exponent from its bit pattern (exact; the exponents stay within float64's normal range)
        bin_width = ((scalars[:, 1].to(torch.int64) + 1023) << 52).view(torch.float64)
        needed = torch.ceil(scalars[:, 0] / bin_width)  # max(1, ceil(amax / width)), as read() computes it
        needed = torch.where(torch.isfinite(needed), needed, 1.0).clamp_(1.0, float(width))  # a NaN/Inf is reported later
        self.block = HistogramBlock(ints.to(torch.float64), needed.to(torch.int64), bin_width)

    def complete(self, scalars: Sequence[Sequence[float]]) -> None:
        """Flushes every collector whose state is still the one staged, with its row of ``scalars`` (read back).

        Raises:
            NonFiniteActivationError: as :func:`flush_all`, for the first collector that saw a NaN/Inf.
        """
        for r, (collector, (state, generation, batches)) in enumerate(zip(self.collectors, self._states)):
            # A collector read (and flushed) since, or counting again, is not this state any more.
            if collector._device is state and state.generation == generation and state.batches == batches:
                collector.flush(scalars[r], self._ints[r])


def defer_flush(collectors: "Sequence[HistogramCollector]") -> Optional[PendingFlush]:
    """:func:`flush_all` without its read-back, where every collector with batches holds them only on
    one device in states of the same bins (a pass's usual end); None otherwise (nothing done)."""
    with_batches = [c for c in collectors if c.num_batches]
    if not with_batches or any(c._device is None or c._num_batches or c._counts is not None or c._zeros
                                or c._amax for c in with_batches):
        return None
    accumulators = [c._device for c in with_batches]
    if len({a.counts.device for a in accumulators}) != 1:
        return None
    staged = _stage(accumulators)
    if staged is None:
        return None
    _counted().clear()  # the pass is over: no tensor of it is handed to a layer again
    return PendingFlush(with_batches, accumulators, *staged)


def flush_all(collectors: "Sequence[HistogramCollector]") -> None:
    """:meth:`HistogramCollector.flush` for many collectors, one read-back per device.

    Raises:
        NonFiniteActivationError: for the first collector (in order) that saw a NaN/Inf;
            the collectors before it are flushed, the ones after it keep their pending batches.
    """
    _counted().clear()  # the pass is over: no tensor of it is handed to a layer again
    by_device: Dict[torch.device, List["HistogramCollector"]] = {}
    for collector in collectors:
        if collector._device is not None:
            by_device.setdefault(collector._device.counts.device, []).append(collector)
    read: Dict[int, Tuple[List[float], torch.Tensor]] = {}
    for group in by_device.values():
        scalars, counts = read_many([c._device for c in group])
        for collector, values, row in zip(group, scalars, counts):
            read[id(collector)] = (values, row)
    for collector in collectors:
        if id(collector) in read:
            collector.flush(*read[id(collector)])


class _Flushed:
    """A collector attribute that first folds the device path's pending batches in."""

    def __init__(self, slot: str) -> None:
        self.slot = slot

    def __get__(self, collector: Optional["HistogramCollector"], owner: type = None):
        if collector is None:
            return self
        collector.flush()
        return getattr(collector, self.slot)

    def __set__(self, collector: "HistogramCollector", value) -> None:
        collector.flush()
        setattr(collector, self.slot, value)


class HistogramCollector:
    """Accumulates the statistics of one activation tensor, on that tensor's device.

    Args:
        num_bins: Resolution: the histogram keeps between ``num_bins`` and
            ``2 * num_bins`` bins over ``[0, running max]``.
        name: Name of the tensor (the module it feeds), used in error messages.
        sync_free: Use the device path (no read-back per batch). Default: for
            CUDA tensors. The counts are the same either way.
    """

    def __init__(self, num_bins: int = 2048, name: str = "", sync_free: Optional[bool] = None) -> None:
        self.num_bins = int(num_bins)
        self.name = name
        self.sync_free = sync_free
        self._counts: Optional[torch.Tensor] = None  # int64, on the data's device
        self._bin_width: Optional[float] = None
        self._amax: float = 0.0
        self._num_batches = 0
        self._zeros = 0  # elements seen while every value so far was 0
        self._device: Optional[_DeviceAccumulator] = None
        self._spare: Optional[_DeviceAccumulator] = None  # emptied after a flush, for the next pass

    def __deepcopy__(self, memo: Dict[int, Any]) -> "HistogramCollector":
        """A copy with the same statistics: pending device batches stay pending (nothing is read
        back; see :meth:`_DeviceAccumulator.__deepcopy__`); the emptied spare state is not copied."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = None if key == "_spare" else copy.deepcopy(value, memo)
        return copied

    # -- state (the device path's pending batches are folded in on every read and write) ----
    counts = _Flushed("_counts")
    bin_width = _Flushed("_bin_width")
    amax = _Flushed("_amax")
    _pending_zeros = _Flushed("_zeros")

    @property
    def num_batches(self) -> int:
        return self._num_batches + (self._device.batches if self._device is not None else 0)

    @num_batches.setter
    def num_batches(self, value: int) -> None:
        self.flush()
        self._num_batches = int(value)

    @property
    def num_elements(self) -> int:
        total = self._pending_zeros
        if self.counts is not None:
            total += int(self.counts.sum())
        return total

    # -- adding batches ----------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Adds one batch. Raises NonFiniteActivationError on NaN/Inf.

        On the device path the error is raised when the statistics are next
        read (it names the module and the range of batches since the last read).
        """
        if x.requires_grad:  # only the values are read (a detach per layer per batch is host time)
            x = x.detach()
        n = x.numel()
        if n == 0:
            return
        accumulator = self._device
        if accumulator is not None and accumulator.accepts(x):  # the common batch: straight on
            accumulator.update(x, n)
            return
        if self.sync_free if self.sync_free is not None else x.is_cuda:
            if _recording() is not None:
                raise NotCapturable(f"statistics of '{self.name}' start inside a CUDA graph capture")
            if accumulator is not None:
                self.flush()  # a batch of another dtype or device: fold in and start over
            if self._spare is not None and self._spare.accepts(x):
                self._device, self._spare = self._spare, None
            else:
                self._device = _DeviceAccumulator(self.num_bins, x)
            self._device.update(x, n)
            return
        self._update_host(x)

    def _update_host(self, x: torch.Tensor) -> None:
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)  # half precision cannot hold |x| / width exactly
        if FUSED_KERNELS and histogram_cpu.takes(x) and self._update_host_fused(x):
            return
        a = x.abs()
        batch_max = float(a.max())  # one host sync per tensor per batch
        if not math.isfinite(batch_max):
            raise self._non_finite(self.num_batches)
        self._num_batches += 1
        if batch_max > self._amax:
            self._amax = batch_max
        if self._amax == 0.0:
            self._zeros += x.numel()
            return
        self._fit_range(x.device)
        self._count_with_torch(a)

    def _count_with_torch(self, a: torch.Tensor) -> None:
        """Adds ``a = |x|`` (consumed) to the counts at the current width, with torch ops."""
        assert self._counts is not None and self._bin_width is not None
        # ceil(|x| / w) is exact for a power-of-two w: 1 + the bin of every non-zero value, and 0
        # for exact zeros. Counting it directly and folding slot 0 into bin 0 gives the same
        # counts as bincount(clamp(ceil - 1, 0)) with two fewer passes over the tensor; int32
        # (the slot is at most len(counts)) halves the bytes bincount reads.
        num_bins = self._counts.numel()
        slots = _count_slots(a.mul_(1.0 / self._bin_width).ceil_().to(torch.int32).reshape(-1), num_bins + 1)
        self._counts += slots[1 : num_bins + 1]
        self._counts[0] += slots[0]

    def _update_host_fused(self, x: torch.Tensor) -> bool:
        """The host path with the C counting loop; False if that is unavailable.

        Once a range exists, one read: the loop counts at the current width and
        reports the batch max and how many values lie above the bins; only if some
        do (the range grows) is the batch counted again at the new width.
        """
        if histogram_cpu.count_function() is None:
            return False
        counts = self._counts
        if counts is not None and not (counts.device.type == "cpu" and counts.dtype == torch.int64 and counts.is_contiguous()):
            return False  # e.g. statistics loaded onto a GPU: the torch ops handle (or report) it
        # A range wider than 2 * num_bins bins (statistics loaded or merged from elsewhere): its
        # width can grow before a value falls above the bins, so take the max first there too.
        if counts is None or counts.numel() > 2 * self.num_bins:  # the max first (one vectorized read)
            low, high = torch.aminmax(x)
            batch_max, counted = max(-float(low), float(high)), False
        else:
            assert self._bin_width is not None
            result = histogram_cpu.add_counts(x, 1.0 / self._bin_width, counts)
            assert result is not None
            batch_max, above = result
            counted = above == 0  # the counts took the batch (only if it fits and is finite)
        if not math.isfinite(batch_max):
            raise self._non_finite(self.num_batches)
        self._num_batches += 1
        self._amax = max(self._amax, batch_max)
        if counted:
            return True
        if self._amax == 0.0:
            self._zeros += x.numel()
            return True
        self._fit_range(x.device)
        assert self._counts is not None and self._bin_width is not None
        counted = histogram_cpu.add_counts(x, 1.0 / self._bin_width, self._counts)
        if counted is None or counted[1]:  # only if 1 / width overflows float32 (amax below ~2**-116)
            self._count_with_torch(x.abs())
        return True

    def _non_finite(self, batch: int) -> NonFiniteActivationError:
        return NonFiniteActivationError(
            f"non-finite value (NaN or Inf) in the input of '{self.name or '<unnamed>'}' "
            f"during calibration batch {batch}"
        )

    def flush(self, scalars: "Optional[Sequence[float]]" = None, counts: Optional[torch.Tensor] = None) -> None:
        """Folds the device path's pending batches into the host-side state (one read-back).

        Args:
            scalars, counts: This tensor's values and converted counts from :func:`read_many`
                (see :func:`flush_all`).

        Raises:
            NonFiniteActivationError: a NaN/Inf reached this tensor in one of those batches.
        """
        pending, self._device = self._device, None
        if pending is None:
            return
        try:
            amax, width, counts = pending.read(scalars, counts)
        except ValueError:
            first = self._num_batches
            raise NonFiniteActivationError(
                f"non-finite value (NaN or Inf) in the input of '{self.name or '<unnamed>'}' "
                f"during calibration (one of batches {first}-{first + pending.batches - 1})"
            ) from None
        if amax == 0.0:
            self._add(counts=None, width=None, amax=0.0, num_batches=pending.batches, zeros=int(counts[0]))
        else:
            self._add(counts=counts, width=width, amax=amax, num_batches=pending.batches, zeros=0, owned=True)
        if pending.in_graph:  # graphs captured with this state must not run again (quantlab.cuda_graphs)
            _EPOCH[0] += 1
            pending.in_graph = False
        pending.reset()
        self._spare = pending

    def _fit_range(self, device: torch.device) -> None:
        """Chooses the width for the running max, merging or appending bins."""
        width = bin_width_for(self._amax, self.num_bins)
        needed = max(1, math.ceil(self._amax / width))
        if self._counts is None:
            self._counts = torch.zeros(needed, dtype=torch.int64, device=device)
            self._counts[0] += self._zeros
            self._zeros = 0
            self._bin_width = width
            return
        assert self._bin_width is not None
        if width > self._bin_width:
            self._counts = merge_pairs(self._counts, int(round(math.log2(width / self._bin_width))))
            self._bin_width = width
        if self._counts.numel() < needed:
            self._counts = torch.cat([self._counts, self._counts.new_zeros(needed - self._counts.numel())])

    def _add(self, counts: Optional[torch.Tensor], width: Optional[float], amax: float, num_batches: int, zeros: int,
             owned: bool = False) -> None:
        """Adds a histogram (``counts`` at ``width``, or None if it saw only zeros) into this one.

        ``owned``: ``counts`` is a fresh tensor this collector may keep as its own.
        """
        self._num_batches += num_batches
        self._zeros += zeros
        if owned and counts is not None and self._counts is None and self._zeros == 0:  # nothing to merge with
            self._counts, self._bin_width, self._amax = counts, width, max(self._amax, amax)
            return
        if counts is None:
            if self._counts is not None:  # a range exists: zeros belong in bin 0
                self._counts[0] += self._zeros
                self._zeros = 0
            return
        assert width is not None
        self._amax = max(self._amax, amax)
        device = counts.device if self._counts is None else self._counts.device
        self._fit_range(device)
        assert self._counts is not None and self._bin_width is not None
        theirs = merge_pairs(counts.to(device), int(round(math.log2(self._bin_width / width))))
        if theirs.numel() > self._counts.numel():  # cannot happen after _fit_range; keep it safe
            self._counts = torch.cat([self._counts, self._counts.new_zeros(theirs.numel() - self._counts.numel())])
        self._counts[: theirs.numel()] += theirs

    @property
    def zeros_before_range(self) -> int:
        """Exact zeros seen while no non-zero value had set a range yet (they join bin 0 later)."""
        return self._pending_zeros

    def replace_state(self, *, counts: Optional[torch.Tensor], bin_width: Optional[float], amax: float,
                      num_batches: int, zeros: int = 0) -> None:
        """Replaces everything this collector holds (e.g. by statistics merged across ranks).

        Args:
            counts: The histogram at ``bin_width`` (kept, not copied), or None if only zeros were seen.
            bin_width: Its bin width (None with ``counts``).
            amax: The running max of |x|.
            num_batches: Batches the statistics cover.
            zeros: Zeros seen before any range (only with ``counts`` None).
        """
        self.flush()
        self._counts, self._bin_width, self._amax = counts, bin_width, float(amax)
        self._num_batches, self._zeros = int(num_batches), int(zeros)

    def reuse_device_state(self, previous: "HistogramCollector") -> None:
        """Takes over ``previous``'s emptied device state (same bins), to save allocations per pass."""
        if previous.num_bins == self.num_bins and self._spare is None:
            self._spare, previous._spare = previous._spare, None

    def merge_(self, other: "HistogramCollector") -> "HistogramCollector":
        """Adds ``other``'s statistics into this collector (e.g. from another rank)."""
        self.flush()
        other.flush()
        self._add(other._counts, other._bin_width, other._amax, other._num_batches, other._zeros)
        return self

    def stats(self) -> Optional[HistogramStats]:
        """The collected statistics, or None if nothing (or only zeros) was seen."""
        if self.counts is None or self.bin_width is None:
            return None
        return HistogramStats(counts=self.counts, bin_width=self.bin_width, amax=self.amax)

    @classmethod
    def from_stats(cls, stats: HistogramStats, num_bins: int = 2048, name: str = "") -> "HistogramCollector":
        """Rebuilds a collector from saved statistics (to merge or re-calibrate)."""
        collector = cls(num_bins=num_bins, name=name)
        collector._counts = stats.counts.to(torch.int64).clone()
        collector._bin_width = float(stats.bin_width)
        collector._amax = float(stats.amax)
        collector._num_batches = 1
        return collector
