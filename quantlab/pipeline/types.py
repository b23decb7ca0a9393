"""What flows between the pipeline's stages: statistics, then ranges."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from quantlab.calibrators import HistogramStats


@dataclasses.dataclass
class Statistics:
    """The result of one statistics pass (``collect``), the input of ``choose``.

    Attributes:
        histograms: Input tensor (by module name) -> its statistics, for every
            tensor that received data; None for one that saw only zeros.
        batches: Input tensor -> batches it saw (0: no calibration batch reached it).
        num_bits: Integer width of the activations (from the quantizers' spec).
        seconds: Wall time of the pass (merge across ranks included).
    """

    histograms: Dict[str, Optional[HistogramStats]]
    batches: Dict[str, int]
    num_bits: int = 8
    seconds: float = 0.0

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
