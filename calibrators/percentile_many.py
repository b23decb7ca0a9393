"""The ``percentile`` calibrator over many histograms at once (same amax as :mod:`.percentile`)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .base import HistogramBlock, HistogramStats, PendingChoice, register_batched_calibrator, register_block_calibrator
from .many import block_choice, integer_rows, pack_counts, split_trivial


@register_batched_calibrator("percentile")
def percentile_many(stats: Sequence[HistogramStats], *, num_bits: int = 8, percentile: float = 99.99) -> List[Optional[float]]:
    """:func:`~.percentile.percentile_calibrator` for every histogram: one cumsum, one search, one read-back.

    The per-tensor calibrator's cumulative counts are float64 sums of integers;
    for rows of integers below ``2**53`` they are exact in any order, so the
    padded rows' cumsum (trailing zeros keep it flat) gives the same values and
    the same search result. Other rows are left to the per-tensor calibrator.

    Raises:
        ValueError: If ``percentile`` is not in ``(0, 100]``.
    """
    p = _checked(percentile)
    out, rows = split_trivial(stats)
    if not rows:
        return out
    return _settle(out, stats, rows, _enqueue(pack_counts([stats[t].counts for t in rows]), p).tolist())


@register_block_calibrator("percentile")
def percentile_block(block: HistogramBlock, *, num_bits: int = 8, percentile: float = 99.99) -> PendingChoice:
    """:func:`percentile_many` on a :class:`HistogramBlock` (a row's zeros past its bins keep its cumsum flat)."""
    return block_choice(_enqueue(block.counts, _checked(percentile)), _settle)


def _checked(percentile: float) -> float:
    p = float(percentile)
    if not (0.0 < p <= 100.0):  # also rejects NaN; the same message as the per-tensor form
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    return p


def _enqueue(bins: torch.Tensor, p: float) -> torch.Tensor:
    """Per row: the search's index, whether the total is positive, whether the counts are exact integers."""
    cumulative = torch.cumsum(bins, dim=1)
    total = cumulative[:, -1]
    # p / 100 * total, rounded once as the per-tensor form's Python arithmetic rounds it.
    threshold = total * (p / 100.0)
    index = torch.searchsorted(cumulative, threshold[:, None], right=False)[:, 0]
    decided = integer_rows(bins)
    return torch.stack([index.to(torch.float64), (total > 0).to(torch.float64), decided.to(torch.float64)], dim=1)


def _settle(out: List[Optional[float]], stats: Sequence[HistogramStats], rows: List[int],
            read: List[List[float]]) -> List[Optional[float]]:
    for t, (idx, positive, ok) in zip(rows, read):
        if not ok:
            continue
        s = stats[t]
        if not positive:
            out[t] = 0.0
            continue
        idx = min(int(idx), s.num_bins - 1)
        out[t] = min((idx + 1) * float(s.bin_width), float(s.amax))
    return out
