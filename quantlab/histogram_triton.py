"""The statistics pass's device path in three Triton kernels (CUDA; float32/16 inputs).

Same bins and counts as :class:`quantlab.statistics._DeviceAccumulator` (the
torch-ops version), in three launches per batch instead of about twenty, and two
reads of the activation instead of about seven memory passes:

1. ``_batch_max``: max of the finite |x| over the batch, atomically into a device
   slot, and a count of NaN/Inf (reported when the statistics are read);
2. ``_update_range``: one program: the running max, the new bin-width exponent
   (the frexp exponent of the float just below ``amax / size``, from its bits),
   ``2**-exponent`` as the scale, and, only when the width grew by ``2**k``, the
   counts moved to bin ``i >> k``;
3. ``_count``: ``ceil(|x| * scale)`` (exact: a power-of-two scale); every value
   above zero adds 1 to its bin. The counts are kept in ``COPIES`` interleaved
   copies, each block of the tensor adding into one of them, so that the atomic
   additions of a popular bin are spread over as many addresses; :meth:`read` sums
   them. Zeros are not counted at all: they are the elements left over.

Why: on a ResNet-50 the torch-ops version spent more host time launching kernels
than the GPU spent on the forward (benchmarks/RESULTS.md). ``tl.histogram`` was
tried first and ran at 54 GB/s with 4,096 bins; plain atomics are used instead.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

_BLOCK = 4096
COPIES = 32
_MIN_EXPONENT, _MAX_EXPONENT = -126, 126
# state slots (float32): running max, batch max, exponent, scale, non-finite count
_AMAX, _BATCH_MAX, _EXPONENT, _SCALE, _BAD = range(5)
_FLT_MAX = 3.4028234663852886e38


@triton.jit
def _batch_max(x_ptr, n, state_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.abs(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    finite = a <= _FLT_MAX  # False for NaN and Inf
    tl.atomic_max(state_ptr + _BATCH_MAX, tl.max(tl.where(finite, a, 0.0), axis=0))
    bad = tl.sum((mask & ~finite).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_add(state_ptr + _BAD, bad.to(tl.float32))


@triton.jit
def _update_range(state_ptr, counts_ptr, SIZE: tl.constexpr, SIZE_LOG2: tl.constexpr, COPIES: tl.constexpr):
    running = tl.load(state_ptr + _AMAX)
    amax = tl.maximum(running, tl.load(state_ptr + _BATCH_MAX))
    previous = tl.load(state_ptr + _EXPONENT).to(tl.int32)
    # frexp exponent of nextafter(amax, 0): for a positive float, its bits minus one.
    below = amax.to(tl.int32, bitcast=True) - 1
    exponent = ((below >> 23) & 0xFF) - 126 - SIZE_LOG2
    exponent = tl.where(amax > 0, exponent, previous)
    exponent = tl.minimum(tl.maximum(exponent, _MIN_EXPONENT), _MAX_EXPONENT)
    shift = tl.minimum(tl.maximum(exponent - previous, 0), 62)
    if shift > 0:  # the range grew: bin i moves to i >> shift, in every copy
        index = tl.arange(0, SIZE)
        for copy in range(COPIES):
            row = counts_ptr + copy * SIZE
            counts = tl.load(row + index)
            moved = counts != 0
            tl.store(row + index, tl.zeros_like(counts), mask=moved)
            tl.debug_barrier()
            tl.atomic_add(row + (index >> shift), counts, mask=moved)
            tl.debug_barrier()
    tl.store(state_ptr + _AMAX, amax)
    tl.store(state_ptr + _BATCH_MAX, 0.0)
    tl.store(state_ptr + _EXPONENT, exponent.to(tl.float32))
    tl.store(state_ptr + _SCALE, ((127 - exponent) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _count(x_ptr, n, state_ptr, counts_ptr, SIZE: tl.constexpr, COPIES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    scale = tl.load(state_ptr + _SCALE)
    a = tl.abs(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    slot = tl.ceil(a * scale)  # 0 for zeros, else 1 + the value's bin
    counted = mask & (a <= _FLT_MAX) & (slot >= 1.0)
    bin_index = tl.minimum(tl.maximum(slot - 1.0, 0.0), SIZE - 1).to(tl.int32)
    row = counts_ptr + (pid % COPIES) * SIZE
    tl.atomic_add(row + bin_index, tl.full([BLOCK], 1, tl.int64), mask=counted)


class TritonAccumulator:
    """Drop-in for ``_DeviceAccumulator``: CUDA float32/float16/bfloat16, power-of-two ``num_bins``."""

    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, num_bins: int, x: torch.Tensor) -> None:
        if num_bins & (num_bins - 1):
            raise ValueError("the Triton statistics kernels need a power-of-two num_bins")
        self.size = 2 * num_bins
        device = x.device
        # Built with fills, not from a Python list: a host-to-device copy would synchronize.
        self.state = torch.zeros(5, dtype=torch.float32, device=device)
        self.state[_EXPONENT] = _MIN_EXPONENT
        self.counts = torch.zeros(COPIES * self.size, dtype=torch.int64, device=device)
        self.batches = 0
        self.elements = 0

    @classmethod
    def supports(cls, num_bins: int, x: torch.Tensor) -> bool:
        return num_bins & (num_bins - 1) == 0 and x.dtype in cls.dtypes and x.numel() < 2**62

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype in self.dtypes and x.device == self.counts.device

    def update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)  # a view for contiguous tensors
        n = flat.numel()
        grid = (triton.cdiv(n, _BLOCK),)
        _batch_max[grid](flat, n, self.state, BLOCK=_BLOCK)
        _update_range[(1,)](self.state, self.counts, SIZE=self.size, SIZE_LOG2=self.size.bit_length() - 1, COPIES=COPIES)
        _count[grid](flat, n, self.state, self.counts, SIZE=self.size, COPIES=COPIES, BLOCK=_BLOCK)
        self.batches += 1
        self.elements += n

    def read(self) -> Tuple[float, float, torch.Tensor]:
        """``(amax, bin width, int64 counts trimmed to the host path's length)``: one read-back.

        Raises:
            ValueError: a NaN/Inf was seen.
        """
        counts = self.counts.view(COPIES, self.size).sum(dim=0)
        amax, _, exponent, _, bad, counted = torch.cat([self.state.double(), counts.sum().double().reshape(1)]).tolist()
        if bad > 0:
            raise ValueError("non-finite")
        width = math.ldexp(1.0, int(exponent))
        needed = max(1, math.ceil(amax / width))
        counts = counts[:needed].clone()
        counts[0] += self.elements - int(counted)
        return amax, width, counts
