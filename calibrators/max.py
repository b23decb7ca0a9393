"""The ``max`` calibrator: the full observed range, nothing clipped."""
from __future__ import annotations

from typing import List, Optional, Sequence

from .base import HistogramStats, register_batched_calibrator, register_calibrator


@register_calibrator("max")
def max_calibrator(stats: HistogramStats, *, num_bits: int = 8) -> float:
    """Returns the running maximum of ``|x|``.

    The histogram is deliberately not read: a max-only collector may hand over
    empty counts, and the running max is exact while the histogram is binned.

    Args:
        stats: Collected statistics; only ``stats.amax`` is used.
        num_bits: Accepted for the common calibrator signature; unused because
            the max range does not depend on the number of levels.

    Returns:
        ``stats.amax`` as a Python float (``0.0`` when nothing non-zero was seen).
    """
    amax = float(stats.amax)
    # A zero (or, for malformed stats, negative) range means "nothing seen";
    # the quantizer treats amax 0 specially, so normalise to exactly 0.0.
    return amax if amax > 0.0 else 0.0


@register_batched_calibrator("max")
def max_many(stats: Sequence[HistogramStats], *, num_bits: int = 8) -> List[Optional[float]]:
    """:func:`max_calibrator` for every histogram (host arithmetic only, no device work)."""
    return [max_calibrator(s, num_bits=num_bits) for s in stats]
