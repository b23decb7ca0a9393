"""Choosing the ranges of many tensors with one calibrator: the one place that maps
statistics to amax (the PTQ pipeline's ``choose`` stage, a scales file's
re-calibration and the ranks of a distributed run all come here).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

from .base import HistogramStats, get_calibrator


def choose_amax(calibrator: Callable[..., float], stats: HistogramStats, num_bits: int, **params: Any) -> float:
    """Runs a calibrator on one tensor's statistics, capped at the observed max.

    Histogram-based calibrators answer with a bin edge; the last bin's right
    edge can sit slightly above the largest value seen, which is never useful.
    """
    return min(float(calibrator(stats, num_bits=num_bits, **params)), float(stats.amax))


def choose_many(name: str, statistics: Mapping[str, Optional[HistogramStats]], *, num_bits: int = 8,
                params: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """The amax calibrator ``name`` chooses for every tensor of ``statistics``.

    Args:
        name: A registered calibrator.
        statistics: Tensor name -> its statistics; None for a tensor that saw
            only zeros (its range is 0.0).
        num_bits: Integer width of the activations.
        params: The calibrator's parameters.

    Returns:
        Tensor name -> amax (a Python float, capped at the observed max), in
        the order of ``statistics``.

    Raises:
        UnknownCalibratorError: for an unregistered name.
    """
    fn = get_calibrator(name)
    extra = dict(params or {})
    return {key: 0.0 if stats is None else choose_amax(fn, stats, num_bits, **extra) for key, stats in statistics.items()}
