"""Post-training quantization as one call: one statistics pass, many calibrators."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from torch import nn

from quantlab.api import calibrate, quantize
from quantlab.attach import collect_statistics
from quantlab.batching import forward_loop
from quantlab.calibrators import get_calibrator, list_calibrators
from quantlab.config import QuantConfig, int8_config
from quantlab.errors import CalibrationError
from quantlab.scales import Scales


@dataclasses.dataclass
class PTQResult:
    """What one PTQ run produced.

    Attributes:
        scales: Scales per calibrator name (same statistics for all).
        num_batches: Batches in the statistics pass.
        statistics_seconds: Wall time of the statistics pass.
        calibrate_seconds: Wall time of each calibrator (all tensors).
    """

    scales: Dict[str, Scales]
    num_batches: int
    statistics_seconds: float
    calibrate_seconds: Dict[str, float]

    def save(self, out_dir: "str | Path") -> Dict[str, Path]:
        """Writes ``scales.<calibrator>.json`` files; returns their paths by calibrator."""
        out = Path(out_dir)
        return {name: s.save(out / f"scales.{name}.json") for name, s in self.scales.items()}


def parse_calibrators(names: "str | Sequence[str]") -> List[str]:
    """``"all"`` or a comma list → validated calibrator names (unknown names raise)."""
    if isinstance(names, str):
        names = list_calibrators() if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise CalibrationError("no calibrator given")
    for name in names:
        get_calibrator(name)  # raises UnknownCalibratorError listing the known ones
    return list(dict.fromkeys(n.lower() for n in names))


def run_ptq(
    model: nn.Module,
    data: Iterable[Any],
    calibrators: "str | Sequence[str]" = "all",
    *,
    config: Optional[QuantConfig] = None,
    max_batches: Optional[int] = None,
    calibrator_params: Optional[Dict[str, Dict[str, Any]]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> PTQResult:
    """Quantizes ``model`` in place, runs ONE statistics pass and every calibrator.

    The model is left fake-quantizing with the last calibrator's ranges.

    Args:
        model: The FP32 model (its device is used).
        data: Calibration batches.
        calibrators: Names or ``"all"``.
        config: Quantization config (default :func:`int8_config`).
        max_batches: Use at most this many batches.
        calibrator_params: Per-calibrator parameters, e.g. ``{"percentile": {"percentile": 99.9}}``.
        progress: Called with the number of batches done.

    Raises:
        CalibrationError: if the data is empty.
    """
    names = parse_calibrators(calibrators)
    params = calibrator_params or {}
    quantize(model, config or int8_config())
    start = time.perf_counter()
    counts = collect_statistics(model, forward_loop(data, max_batches=max_batches, progress=progress))
    statistics_seconds = time.perf_counter() - start
    num_batches = max(counts.values(), default=0)
    if num_batches == 0:
        raise CalibrationError("calibration data is empty: no batch reached the model")
    scales: Dict[str, Scales] = {}
    times: Dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        scales[name] = calibrate(model, name, **params.get(name, {}))
        times[name] = time.perf_counter() - t0
    return PTQResult(scales=scales, num_batches=num_batches, statistics_seconds=statistics_seconds, calibrate_seconds=times)


