"""Choosing the ranges of a model's tensors with one calibrator: the one place that maps
statistics to amax (the PTQ pipeline's ``choose`` stage, a scales file's re-calibration
and the ranks of a distributed run all come here). The work is batched across tensors
by :func:`quantlab.calibrators.choose_many`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from .base import HistogramStats
from .many import choose_many


def choose_amax(calibrator: Callable[..., float], stats: HistogramStats, num_bits: int, **params: Any) -> float:
    """Runs a calibrator on one tensor's statistics, capped at the observed max.

    Histogram-based calibrators answer with a bin edge; the last bin's right
    edge can sit slightly above the largest value seen, which is never useful.
    """
    return min(float(calibrator(stats, num_bits=num_bits, **params)), float(stats.amax))


def choose_ranges(name: str, statistics: Mapping[str, Optional[HistogramStats]], *, num_bits: int = 8,
                  params: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """The amax calibrator ``name`` chooses for every tensor of ``statistics``, in one batched call.

    The same values as :func:`choose_amax` per tensor (the batched forms return
    their per-tensor results bit for bit).

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
    seen: List[str] = [key for key, stats in statistics.items() if stats is not None]
    chosen = choose_many(name, [statistics[key] for key in seen], num_bits=num_bits, **dict(params or {}))
    return capped_ranges(statistics, dict(zip(seen, chosen)))


def capped_ranges(statistics: Mapping[str, Optional[HistogramStats]], chosen: Mapping[str, float]) -> Dict[str, float]:
    """Tensor name -> ``chosen`` amax capped at the observed max, in the order of ``statistics``
    (0.0 for a tensor without statistics or without a choice)."""
    return {key: 0.0 if stats is None or key not in chosen else min(float(chosen[key]), float(stats.amax))
            for key, stats in statistics.items()}
