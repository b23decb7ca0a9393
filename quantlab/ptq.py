"""Post-training quantization as one call on a dataset: one statistics pass, many
calibrators (the pipeline of :mod:`quantlab.pipeline` fed from an iterable of batches)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from quantlab import distributed
from quantlab.batching import forward_loop
from quantlab.calibrators import get_calibrator, list_calibrators
from quantlab.config import QuantConfig
from quantlab.errors import CalibrationError
from quantlab.pipeline import PTQResult, apply_each, choose_all, run, statistics_of
from quantlab.scales import Scales

__all__ = ["PTQResult", "parse_calibrators", "run_calibrators", "run_ptq"]


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
    """Every calibrator in ``names`` on the statistics the model holds (no new pass, no refiners).

    With ``across_ranks`` (collective; every rank holds the merged statistics)
    each rank chooses the ranges of its share of the tensors and all get all.

    Returns the scales and the seconds of each calibrator. The model is left
    fake-quantizing with the last calibrator's ranges.
    """
    params = params or {}
    statistics = statistics_of(model)
    group = distributed.world_group() if across_ranks else None
    chosen = choose_all(statistics, {name: params.get(name, {}) for name in names}, group=group)
    result = PTQResult(scales={}, num_batches=statistics.num_batches, statistics_seconds=statistics.seconds, calibrate_seconds={})
    apply_each(model, statistics, chosen, result)
    return result.scales, result.calibrate_seconds


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
    rank's shard (see :func:`quantlab.batching.shard_batches`), the
    histograms and maxima are all-reduced exactly after the pass, the
    calibrators' work is split by tensor, and every rank ends with the same
    ranges as one process on all the shards would choose. A failure on one
    rank is raised on all of them.

    Args:
        model: The FP32 model (its device is used).
        data: Calibration batches (this rank's shard under torch.distributed).
        calibrators: Names or ``"all"``.
        config: Quantization config (default :func:`quantlab.int8_config`).
        max_batches: Use at most this many batches.
        calibrator_params: Per-calibrator parameters, e.g. ``{"percentile": {"percentile": 99.9}}``.
        progress: Called with the number of batches done.
        across_ranks: Merge over the ranks of the process group (every rank must call it).

    Raises:
        CalibrationError: if the data is empty.
    """
    names = parse_calibrators(calibrators)
    params = calibrator_params or {}
    group = distributed.world_group() if across_ranks else None
    loop = forward_loop(data, max_batches=max_batches, progress=progress)
    return run(model, loop, {name: params.get(name, {}) for name in names}, config=config, group=group)
