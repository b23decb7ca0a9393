"""Statistics type and the registry shared by every calibrator.

Calibrators are the lowest floor of quantlab: pure functions from collected
statistics to an ``amax``. They import nothing from the rest of quantlab so they
can be re-run later on saved statistics, without a model or data.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Protocol

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


_REGISTRY: Dict[str, Callable[..., float]] = {}


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
