"""The pipeline's ``choose`` stage: statistics to ranges, pure (no model, no data).

Every calibrator's choice goes through :func:`quantlab.calibrators.choose_ranges` (batched
across tensors).
With a process group (every rank holding the same merged statistics), rank ``r``
chooses the ranges of tensors ``r, r + N, ...`` with every calibrator and one
all-gather gives all ranks every range.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

from quantlab import distributed
from quantlab.calibrators import BlockChoices, choose_ranges, get_calibrator
from quantlab.pipeline.types import Ranges, Statistics

Calibrators = Union[str, Sequence[str], Mapping[str, Mapping[str, Any]]]


def calibrator_params(calibrators: Calibrators) -> Dict[str, Dict[str, Any]]:
    """``"entropy"``, ``["max", "mse"]`` or ``{"percentile": {"percentile": 99.9}}`` -> name -> params."""
    if isinstance(calibrators, str):
        return {calibrators.lower(): {}}
    if isinstance(calibrators, Mapping):
        return {str(name).lower(): dict(params or {}) for name, params in calibrators.items()}
    return {str(name).lower(): {} for name in calibrators}


def choose(statistics: Statistics, calibrator: str, params: Optional[Mapping[str, Any]] = None, *,
           group: Any = None) -> Ranges:
    """The ranges one calibrator chooses from ``statistics`` (see :func:`choose_all`)."""
    return choose_all(statistics, {calibrator: dict(params or {})}, group=group)[calibrator.lower()]


def choose_all(statistics: Statistics, calibrators: Calibrators, *, group: Any = None) -> Dict[str, Ranges]:
    """The ranges every calibrator chooses from the same statistics.

    Args:
        statistics: From ``collect`` (or saved with a scales file).
        calibrators: Names, or name -> parameters.
        group: A process group: collective; the work is split by tensor over
            the ranks and every rank gets every range. A failure on one rank
            is raised on every rank.

    Returns:
        Calibrator name -> :class:`Ranges`, in the order given.

    Raises:
        UnknownCalibratorError: for an unregistered name (before any work).
    """
    wanted = calibrator_params(calibrators)
    for name in wanted:
        get_calibrator(name)
    if statistics.pending is not None and group is None:
        return _choose_behind_the_pass(statistics, wanted)
    names = list(statistics.histograms)
    rank, size = distributed.group_rank(group), distributed.group_size(group)
    mine_names = names[rank::size]
    seconds = dict.fromkeys(wanted, 0.0)
    chosen: Dict[str, Dict[str, float]] = {}
    error: Optional[BaseException] = None
    try:
        for name, params in wanted.items():
            start = time.perf_counter()
            chosen[name] = choose_ranges(name, {n: statistics.histograms[n] for n in mine_names},
                                       num_bits=statistics.num_bits, params=params)
            seconds[name] += time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - under a group, re-raised on every rank below
        if group is None:
            raise
        error = exc
    if group is not None:
        start = time.perf_counter()
        parts = distributed.gather_results(error, chosen, "choosing the ranges", group)
        chosen = {name: {} for name in wanted}
        for part in parts:
            for name, amax in part.items():
                chosen[name].update(amax)
        shared = (time.perf_counter() - start) / max(1, len(wanted))
        seconds = {name: t + shared for name, t in seconds.items()}
    return {
        name: Ranges(calibrator=name, params=params, inputs={n: chosen[name][n] for n in names}, seconds=seconds[name])
        for name, params in wanted.items()
    }


def _choose_behind_the_pass(statistics: Statistics, wanted: Dict[str, Dict[str, Any]]) -> Dict[str, Ranges]:
    """Every calibrator's block form enqueued behind a deferred pass, then ONE read-back for the
    statistics and all the choices (the host's work overlaps the pass's GPU work).

    The same ranges as :func:`choose_ranges` on the histograms, bit for bit.
    """
    start = time.perf_counter()
    pending = statistics.pending
    assert pending is not None
    choices = BlockChoices(pending.flush.block, wanted, num_bits=statistics.num_bits)
    read = torch.cat([pending.flush.scalars, choices.values], dim=1).tolist()  # waits for the pass
    statistics.complete([row[:3] for row in read])  # raises a NaN/Inf the pass saw
    histograms = statistics.histograms
    rows = [histograms.get(name) for name in pending.names]
    chosen = choices.settle([row[3:] for row in read], rows)
    seconds = (time.perf_counter() - start) / max(1, len(wanted))  # one shared wait: split evenly
    out: Dict[str, Ranges] = {}
    for name, params in wanted.items():
        by_row = {key: (0.0 if stats is None else min(float(amax), float(stats.amax)))
                  for key, stats, amax in zip(pending.names, rows, chosen[name])}
        # Every tensor the statistics hold, in their order (0.0 for one that saw only zeros), as choose_ranges.
        inputs = {key: by_row.get(key, 0.0) for key in histograms}
        out[name] = Ranges(calibrator=name, params=params, inputs=inputs, seconds=seconds)
    return out
