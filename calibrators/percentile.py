"""The ``percentile`` calibrator: clip a fixed fraction of the largest ``|x|``."""
from __future__ import annotations

import torch

from .base import HistogramStats, register_calibrator


@register_calibrator("percentile")
def percentile_calibrator(
    stats: HistogramStats, *, num_bits: int = 8, percentile: float = 99.99
) -> float:
    """Returns the amax below which ``percentile`` % of the ``|x|`` samples fall.

    The answer is the right edge of the first bin where the CDF of the counts
    reaches ``percentile / 100``. Taking the right edge (pytorch-quantization
    takes the left one) guarantees that at least ``percentile`` % of the samples
    are inside the range; it is at most one bin width above the exact sample
    percentile. It is clamped to ``stats.amax`` because the last bin's right
    edge can lie beyond the largest value actually seen.

    Args:
        stats: Collected ``|x|`` histogram.
        num_bits: Accepted for the common calibrator signature; unused.
        percentile: Percentage of samples to keep, ``0 < percentile <= 100``.

    Returns:
        The amax as a Python float; ``0.0`` for an empty histogram or amax 0.

    Raises:
        ValueError: If ``percentile`` is not in ``(0, 100]``.
    """
    p = float(percentile)
    if not (0.0 < p <= 100.0):  # also rejects NaN
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    amax = float(stats.amax)
    if amax <= 0.0 or stats.num_bins == 0:
        return 0.0
    cumulative = torch.cumsum(stats.counts.to(torch.float64), dim=0)
    total = float(cumulative[-1])
    if total <= 0.0:
        return 0.0
    # Compare raw cumulative counts against p/100 * total rather than dividing
    # the cumsum: with integer counts this is exact, and p == 100 reaches the
    # last non-empty bin instead of missing it by a rounding error.
    threshold = torch.tensor(p / 100.0 * total, dtype=torch.float64, device=cumulative.device)
    idx = int(torch.searchsorted(cumulative, threshold, right=False))
    idx = min(idx, stats.num_bins - 1)
    edge = (idx + 1) * float(stats.bin_width)
    return min(edge, amax)
