"""Statistics type and the registry shared by every calibrator.

Calibrators are the lowest floor of quantlab: pure functions from collected
statistics to an ``amax``. They import nothing from the rest of quantlab so they
can be re-run later on saved statistics, without a model or data.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence

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


@dataclasses.dataclass(frozen=True)
class HistogramBlock:
    """Many histograms of one device as one matrix, their sizes still on the device.

    What a statistics pass leaves on a GPU before anything is read back: the
    block forms of the calibrators enqueue their work on it, so their host
    work overlaps the pass's GPU work and one read-back serves them all. Row
    ``r`` is the histogram whose :class:`HistogramStats` has ``num_bins[r]``
    bins of width ``bin_width[r]``; its counts are ``counts[r, :num_bins[r]]``
    (converted to float64 as ``counts.to(torch.float64)`` converts them) and
    zeros after that.

    Attributes:
        counts: ``[rows, width]`` float64, ``width >= num_bins[r]`` for every row.
        num_bins: ``[rows]`` int64.
        bin_width: ``[rows]`` float64.
    """

    counts: torch.Tensor
    num_bins: torch.Tensor
    bin_width: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.counts.shape[0])


class PendingChoice(NamedTuple):
    """A block form's work, enqueued: what to read back, and how to finish from it on the host.

    ``values`` is a ``[rows, k]`` float64 tensor on the block's device;
    ``settle(rows, stats)`` takes its rows as Python lists and the
    :class:`HistogramStats` of the block's rows, and returns what the batched
    form would return for ``stats`` (an amax, or None where only the
    per-tensor calibrator can decide).
    """

    values: torch.Tensor
    settle: Callable[[List[List[float]], Sequence[HistogramStats]], List[Optional[float]]]


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
_BLOCK: Dict[str, Callable[..., PendingChoice]] = {}
_COSTLY: set = set()  # block forms whose device work is worth a read-back of its own (see block_form_is_costly)


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


def register_block_calibrator(name: str, *, costly: bool = False) -> Callable[[Callable[..., PendingChoice]], Callable[..., PendingChoice]]:
    """Decorator that registers ``fn(block, *, num_bits, **params) -> PendingChoice`` as the block form of ``name``.

    A block form enqueues device work only (nothing read back) and validates
    its parameters as the per-tensor calibrator does. Optional: without one,
    the calibrator runs on the histograms after the read-back.

    Args:
        name: The calibrator's name.
        costly: Its device work takes long enough (milliseconds on a GPU) that a
            caller does better to read the others back first and finish them on
            the host meanwhile.
    """

    def decorator(fn: Callable[..., PendingChoice]) -> Callable[..., PendingChoice]:
        key = name.lower()
        if key in _BLOCK and _BLOCK[key] is not fn:
            raise ValueError(f"block calibrator {name!r} is already registered")
        _BLOCK[key] = fn
        if costly:
            _COSTLY.add(key)
        return fn

    return decorator


def block_form_is_costly(name: str) -> bool:
    """Whether ``name``'s block form was registered as ``costly``."""
    return name.lower() in _COSTLY


def get_block_calibrator(name: str) -> Optional[Callable[..., PendingChoice]]:
    """The block form registered under ``name``, or None."""
    return _BLOCK.get(name.lower())
