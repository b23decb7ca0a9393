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
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from quantlab.calibrators import HistogramStats
from quantlab.errors import NonFiniteActivationError


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


def _merge_pairs(counts: torch.Tensor, times: int) -> torch.Tensor:
    for _ in range(times):
        if counts.numel() % 2:
            counts = torch.cat([counts, counts.new_zeros(1)])
        counts = counts.view(-1, 2).sum(dim=1)
    return counts


class HistogramCollector:
    """Accumulates the statistics of one activation tensor, on that tensor's device.

    Args:
        num_bins: Resolution: the histogram keeps between ``num_bins`` and
            ``2 * num_bins`` bins over ``[0, running max]``.
        name: Name of the tensor (the module it feeds), used in error messages.
    """

    def __init__(self, num_bins: int = 2048, name: str = "") -> None:
        self.num_bins = int(num_bins)
        self.name = name
        self.counts: Optional[torch.Tensor] = None  # int64, on the data's device
        self.bin_width: Optional[float] = None
        self.amax: float = 0.0
        self.num_batches = 0
        self._pending_zeros = 0  # elements seen while every value so far was 0

    @property
    def num_elements(self) -> int:
        total = self._pending_zeros
        if self.counts is not None:
            total += int(self.counts.sum())
        return total

    def update(self, x: torch.Tensor) -> None:
        """Adds one batch. Raises NonFiniteActivationError on NaN/Inf."""
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)  # half precision cannot hold |x| / width exactly
        a = x.abs()
        batch_max = float(a.max())  # one host sync per tensor per batch
        if not math.isfinite(batch_max):
            raise NonFiniteActivationError(
                f"non-finite value (NaN or Inf) in the input of '{self.name or '<unnamed>'}' "
                f"during calibration batch {self.num_batches}"
            )
        self.num_batches += 1
        if batch_max > self.amax:
            self.amax = batch_max
        if self.amax == 0.0:
            self._pending_zeros += x.numel()
            return
        self._fit_range(x.device)
        assert self.counts is not None and self.bin_width is not None
        # ceil(|x| / w) is exact for a power-of-two w: 1 + the bin of every non-zero value, and 0
        # for exact zeros. Counting it directly and folding slot 0 into bin 0 gives the same
        # counts as bincount(clamp(ceil - 1, 0)) with two fewer passes over the tensor; int32
        # (the slot is at most len(counts)) halves the bytes bincount reads.
        num_bins = self.counts.numel()
        slots = _count_slots(a.mul_(1.0 / self.bin_width).ceil_().to(torch.int32).view(-1), num_bins + 1)
        self.counts += slots[1 : num_bins + 1]
        self.counts[0] += slots[0]

    def _fit_range(self, device: torch.device) -> None:
        """Chooses the width for the running max, merging or appending bins."""
        width = bin_width_for(self.amax, self.num_bins)
        needed = max(1, math.ceil(self.amax / width))
        if self.counts is None:
            self.counts = torch.zeros(needed, dtype=torch.int64, device=device)
            self.counts[0] += self._pending_zeros
            self._pending_zeros = 0
            self.bin_width = width
            return
        assert self.bin_width is not None
        if width > self.bin_width:
            self.counts = _merge_pairs(self.counts, int(round(math.log2(width / self.bin_width))))
            self.bin_width = width
        if self.counts.numel() < needed:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(needed - self.counts.numel())])

    def merge_(self, other: "HistogramCollector") -> "HistogramCollector":
        """Adds ``other``'s statistics into this collector (e.g. from another rank)."""
        self.num_batches += other.num_batches
        self._pending_zeros += other._pending_zeros
        if other.counts is None:
            return self
        self.amax = max(self.amax, other.amax)
        device = other.counts.device if self.counts is None else self.counts.device
        self._fit_range(device)
        assert self.counts is not None and self.bin_width is not None and other.bin_width is not None
        theirs = _merge_pairs(other.counts.to(device), int(round(math.log2(self.bin_width / other.bin_width))))
        if theirs.numel() > self.counts.numel():  # cannot happen after _fit_range; keep it safe
            self.counts = torch.cat([self.counts, self.counts.new_zeros(theirs.numel() - self.counts.numel())])
        self.counts[: theirs.numel()] += theirs
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
        collector.counts = stats.counts.to(torch.int64).clone()
        collector.bin_width = float(stats.bin_width)
        collector.amax = float(stats.amax)
        collector.num_batches = 1
        return collector
