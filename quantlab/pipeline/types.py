"""What flows between the pipeline's stages: statistics, then ranges."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from quantlab.calibrators import HistogramStats


class Statistics:
    """The result of one statistics pass (``collect``), the input of ``choose``.

    Attributes:
        histograms: Input tensor (by module name) -> its statistics, for every
            tensor that received data; None for one that saw only zeros. Where
            the pass left them on the device (``pending``), reading this waits
            for the device once.
        batches: Input tensor -> batches it saw (0: no calibration batch reached it).
        num_bits: Integer width of the activations (from the quantizers' spec).
        seconds: Wall time of the pass (merge across ranks included).
        pending: The pass's end still on the device (``collect(..., defer=True)``):
            ``choose`` enqueues the calibrators behind it and reads the statistics back with the first ranges.
    """

    def __init__(self, histograms: Optional[Dict[str, Optional[HistogramStats]]] = None,
                 batches: Optional[Dict[str, int]] = None, num_bits: int = 8, seconds: float = 0.0,
                 pending: Optional["PendingStatistics"] = None) -> None:
        self._histograms = dict(histograms or {})
        self.batches = dict(batches or {})
        self.num_bits = num_bits
        self.seconds = seconds
        self.pending = pending
        self._failure: Optional[BaseException] = None  # what completing a pending pass raised

    @property
    def histograms(self) -> Dict[str, Optional[HistogramStats]]:
        if self.pending is not None:
            self.complete(self.pending.flush.scalars.tolist())
        if self._failure is not None:
            raise self._failure
        return self._histograms

    def complete(self, scalars: List[List[float]]) -> None:
        """Finishes a pending pass's end from its scalars, read back (raises what the pass would have raised,
        and again on every later read: the failing tensor's statistics are gone)."""
        pending, self.pending = self.pending, None
        if pending is None:
            if self._failure is not None:
                raise self._failure
            return
        try:
            pending.flush.complete(scalars)
        except BaseException as exc:
            self._failure = exc
            raise
        self._histograms.update({name: c.stats() for name, c in pending.collectors.items()})

    @property
    def num_batches(self) -> int:
        """Batches of the pass (the most any tensor saw)."""
        return max(self.batches.values(), default=0)

    @property
    def unreached(self) -> List[str]:
        """Input tensors no calibration batch reached (they stay in floating point)."""
        return [name for name, count in self.batches.items() if count == 0]

    def saved(self) -> Dict[str, HistogramStats]:
        """The histograms worth saving with the scales (tensors that saw non-zero values)."""
        return {name: stats for name, stats in self.histograms.items() if stats is not None}


@dataclasses.dataclass
class PendingStatistics:
    """A pass's end on the device: the block of every collector's state, by input tensor."""

    flush: Any  #: :class:`quantlab.statistics.PendingFlush`
    collectors: Dict[str, Any]  #: input tensor -> its collector, in the block's row order

    @property
    def names(self) -> List[str]:
        """The input tensors, in the block's row order."""
        return list(self.collectors)


@dataclasses.dataclass
class Ranges:
    """What one calibrator chose for every input tensor (``choose``'s result, ``apply``'s input).

    Attributes:
        calibrator: The calibrator's name.
        params: Its parameters.
        inputs: Input tensor (module name) -> amax, for every tensor that received data.
        seconds: Wall time of the choice (this rank's share under a process group).
    """

    calibrator: str
    params: Dict[str, Any]
    inputs: Dict[str, float]
    seconds: float = 0.0
