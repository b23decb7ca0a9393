"""Statistics type and the registry shared by every calibrator.

Calibrators are the lowest floor of quantlab: pure functions from collected
statistics to an ``amax``. They import nothing from the rest of quantlab so they
can be re-run later on saved statistics, without a model or data.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class HistogramStats:
    """One tensor's statistics, gathered in a single pass over calibration data.

    Attributes:
        counts: Histogram of ``|x|``, shape ``[num_bins]``. Bin ``k`` covers
            ``[k * bin_width, (k + 1) * bin_width)``; the last bin also holds
            values equal to its right edge. Any numeric dtype, any device.
        bin_width: Width of every bin (> 0). Bins are appended with the same
            width when the range grows, so the edges are ``k * bin_width``.
        amax: Running maximum of ``|x|`` over everything that was seen.
    """

    counts: torch.Tensor
    bin_width: float
    amax: float

    @property
    def num_bins(self) -> int:
        return int(self.counts.numel())

    def edges(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Bin edges ``[0, w, 2w, ..., num_bins * w]`` on the counts' device."""
        return torch.arange(self.num_bins + 1, dtype=dtype, device=self.counts.device) * self.bin_width


class Calibrator(Protocol):
    """A calibrator maps statistics to an amax (a positive float)."""

    def __call__(self, stats: HistogramStats, *, num_bits: int = 8, **params) -> float: ...


class BatchedCalibrator(Protocol):
    """The same calibrator over many histograms of one device at once.

    Returns one entry per histogram: the amax the per-tensor calibrator would
    return, bit for bit, or ``None`` where only the per-tensor calibrator can
    decide (``choose_many`` then asks it). Raises what the per-tensor
    calibrator raises for invalid parameters.
    """

    def __call__(self, stats: Sequence[HistogramStats], *, num_bits: int = 8, **params) -> List[Optional[float]]: ...


_REGISTRY: Dict[str, Callable[..., float]] = {}
_BATCHED: Dict[str, Callable[..., List[Optional[float]]]] = {}


class UnknownCalibratorError(KeyError):
    """Raised for a calibrator name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_calibrator(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator that registers ``fn`` under ``name`` (lower case, unique)."""

    def decorator(fn: Callable[..., float]) -> Callable[..., float]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"calibrator {name!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return decorator


def get_calibrator(name: str) -> Callable[..., float]:
    """Returns the calibrator registered under ``name``.

    Raises:
        UnknownCalibratorError: naming the known calibrators.
    """
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise UnknownCalibratorError(
            f"unknown calibrator {name!r}; registered calibrators: {', '.join(list_calibrators())}"
        ) from None


def list_calibrators() -> List[str]:
    """Names of all registered calibrators, sorted."""
    return sorted(_REGISTRY)


def register_batched_calibrator(name: str) -> Callable[[Callable[..., List[Optional[float]]]], Callable[..., List[Optional[float]]]]:
    """Decorator that registers ``fn`` as the batched form of calibrator ``name``.

    A batched form is optional: ``choose_many`` runs the per-tensor calibrator
    once per histogram for a name without one (user calibrators keep working).
    """

    def decorator(fn: Callable[..., List[Optional[float]]]) -> Callable[..., List[Optional[float]]]:
        key = name.lower()
        if key in _BATCHED and _BATCHED[key] is not fn:
            raise ValueError(f"batched calibrator {name!r} is already registered")
        _BATCHED[key] = fn
        return fn

    return decorator


def get_batched_calibrator(name: str) -> Optional[Callable[..., List[Optional[float]]]]:
    """The batched form registered under ``name``, or None."""
    return _BATCHED.get(name.lower())
