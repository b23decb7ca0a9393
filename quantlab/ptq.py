"""Post-training quantization as one call: one statistics pass, many calibrators."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from quantlab import distributed
from quantlab.api import apply_calibrator, quantize
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


def run_calibrators(
    model: nn.Module, names: Sequence[str], params: Optional[Dict[str, Dict[str, Any]]] = None,
    *, across_ranks: bool = False,
) -> Tuple[Dict[str, Scales], Dict[str, float]]:
    """Every calibrator in ``names`` on the statistics the model holds.

    With ``across_ranks`` (collective; every rank holds the merged statistics)
    each rank chooses the ranges of its share of the tensors and all get all.

    Returns the scales and the seconds of each calibrator. The model is left
    fake-quantizing with the last calibrator's ranges.
    """
    params = params or {}
    scales: Dict[str, Scales] = {}
    times: Dict[str, float] = {}
    chosen: Dict[str, Dict[str, float]] = {}
    if across_ranks and distributed.is_distributed():  # each rank: its share of the tensors
        chosen, times = distributed.choose_ranges(model, {name: params.get(name, {}) for name in names})
    for index, name in enumerate(names):
        t0 = time.perf_counter()
        # The weights' ranges do not depend on the calibrator: computed for the first only.
        scales[name] = apply_calibrator(model, name, params.get(name, {}), chosen.get(name), weights=index == 0)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    return scales, times


def run_ptq(
    model: nn.Module,
    data: Iterable[Any],
    calibrators: "str | Sequence[str]" = "all",
    *,
    config: Optional[QuantConfig] = None,
    max_batches: Optional[int] = None,
    calibrator_params: Optional[Dict[str, Dict[str, Any]]] = None,
    progress: Optional[Callable[[int], None]] = None,
    across_ranks: bool = False,
) -> PTQResult:
    """Quantizes ``model`` in place, runs ONE statistics pass and every calibrator.

    The model is left fake-quantizing with the last calibrator's ranges.

    With ``across_ranks=True`` under torch.distributed (a process group of
    several ranks, as torchrun starts) this is collective: ``data`` is this
    rank's shard (see :func:`quantlab.distributed.shard_batches`), the
    histograms and maxima are all-reduced exactly after the pass, the
    calibrators' work is split by tensor, and every rank ends with the same
    ranges as one process on all the shards would choose. A failure on one
    rank is raised on all of them.

    Args:
        model: The FP32 model (its device is used).
        data: Calibration batches (this rank's shard under torch.distributed).
        calibrators: Names or ``"all"``.
        config: Quantization config (default :func:`int8_config`).
        max_batches: Use at most this many batches.
        calibrator_params: Per-calibrator parameters, e.g. ``{"percentile": {"percentile": 99.9}}``.
        progress: Called with the number of batches done.
        across_ranks: Merge over the ranks of the process group (every rank must call it).

    Raises:
        CalibrationError: if the data is empty.
    """
    names = parse_calibrators(calibrators)
    params = calibrator_params or {}
    quantize(model, config or int8_config())
    start = time.perf_counter()
    loop = forward_loop(data, max_batches=max_batches, progress=progress)
    across_ranks = across_ranks and distributed.is_distributed()
    # Across ranks each saw its shard: the histograms are merged exactly, so every rank
    # calibrates on all the data (and counts all the batches).
    counts = distributed.collect_statistics_across_ranks(model, loop) if across_ranks else collect_statistics(model, loop)
    num_batches = max(counts.values(), default=0)
    statistics_seconds = time.perf_counter() - start
    if num_batches == 0:
        raise CalibrationError("calibration data is empty: no batch reached the model")
    scales, times = run_calibrators(model, names, params, across_ranks=across_ranks)
    return PTQResult(scales=scales, num_batches=num_batches, statistics_seconds=statistics_seconds, calibrate_seconds=times)


