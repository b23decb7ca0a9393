"""The "2:4 + INT8" rows of a comparison: prune a copy, calibrate it, evaluate it beside FP32/FP16/INT8.

    from quantlab.evaluation.compare import compare
    from quantlab.sparsity.compare import sparse_candidates
    result = compare(model, calib, eval_data, extra_candidates=sparse_candidates(model, calib, calibrators=["entropy"]))

or, recorded, through the compare job: ``quantlab.jobs.compare.run_compare(...,
sparsity=SparseCompare())`` (what ``quantlab compare --sparsity 2:4`` runs).

Rows carry ``source="sparse"`` (the dashboard labels them "2:4 + INT8 <calibrator>"); the
accuracy is the fake-quant model's (one-shot pruning + PTQ: sparse QAT, ``quantlab qat
--sparsity 2:4``, is what recovers it). Speed is measured where a GPU with cuSPARSELt runs
the pruned INT8 model (:func:`measure_sparse_speed`, :mod:`quantlab.runtimes.cusparselt`):
``latency_ms`` rows for FP16 and for the 2:4 INT8 model.

This module measures; it records nothing (the compare job does).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from torch import nn

from quantlab.batching import model_device, split_batch
from quantlab.sparsity.pattern import PATTERN

SOURCE = "sparse"
QAT_SOURCE = "sparse-qat"
LATENCY_METRIC = "latency_ms"


@dataclasses.dataclass(frozen=True)
class SparseCompare:
    """How a comparison adds its "2:4 + INT8" rows (one per calibrator).

    Attributes:
        method: ``magnitude`` or ``sparsegpt`` (see :func:`quantlab.sparsity.prune`).
        include / exclude: Module-name patterns of the layers to prune / keep dense.
        measure_speed: Time the pruned INT8 model against FP16 where a CUDA device with
            cuSPARSELt runs it (:func:`measure_sparse_speed`).
    """

    method: str = "magnitude"
    include: Tuple[str, ...] = ("*",)
    exclude: Tuple[str, ...] = ()
    measure_speed: bool = True

    def __post_init__(self) -> None:
        from quantlab.sparsity.errors import SparsityError
        from quantlab.sparsity.pruning import METHODS

        if self.method not in METHODS:
            raise SparsityError(f"sparsity method {self.method!r}: expected one of {', '.join(METHODS)}")
        object.__setattr__(self, "include", tuple(self.include or ("*",)))
        object.__setattr__(self, "exclude", tuple(self.exclude or ()))

    def validate(self, model: nn.Module) -> None:
        """Fails before any work when the selection cannot be pruned (names the pattern or layer)."""
        from quantlab.sparsity.pattern import select_layers

        select_layers(model, self.include, self.exclude)

    def settings(self) -> Dict[str, Any]:
        """What a run records about its 2:4 rows."""
        return {"sparsity": PATTERN, "sparsity_method": self.method}


@dataclasses.dataclass
class SparseOutcome:
    """What the "2:4 + INT8" part of a comparison did.

    Attributes:
        reports: The :class:`~quantlab.sparsity.pruning.PruneReport` of the pruned copy.
        speed: :func:`quantlab.runtimes.cusparselt.speed.measure_speedup`'s result where measured.
        speed_note: Why the speed was not measured (None when it was).
        rows: The ``latency_ms`` result rows (FP16 and 2:4 INT8; empty when not measured).
    """

    reports: List[Any] = dataclasses.field(default_factory=list)
    speed: Optional[Dict[str, Any]] = None
    speed_note: Optional[str] = None
    rows: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


def measure_sparse_speed(pruned: nn.Module, eval_data: Iterable[Any], calibrator: Optional[str]) -> SparseOutcome:
    """FP16 vs 2:4 INT8 latency of one eval batch, on a CUDA device with cuSPARSELt.

    Args:
        pruned: The pruned, calibrated model (not modified: the runner times copies).
        eval_data: Eval batches (the first one is timed).
        calibrator: The calibrator whose ranges ``pruned`` holds (labels the INT8 row).

    Returns:
        A :class:`SparseOutcome` with ``speed`` and the ``latency_ms`` rows, or with
        ``speed_note`` saying why nothing was measured (not on CUDA, no cuSPARSELt).
    """
    from quantlab.runtimes.cusparselt.library import CuSparseLtUnavailableError, load_library

    if model_device(pruned).type != "cuda":
        return SparseOutcome(speed_note="the model is not on a CUDA device; run with --device cuda on an NVIDIA GPU")
    try:
        load_library()
    except CuSparseLtUnavailableError as exc:
        return SparseOutcome(speed_note=str(exc))
    from quantlab.runtimes.cusparselt.speed import measure_speedup

    inputs, _ = split_batch(next(iter(eval_data)))
    if isinstance(inputs, dict):
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
    speed = measure_speedup(pruned, inputs)
    rows = [
        {"precision": "fp16", "calibrator": None, "source": "ptq", "metric": LATENCY_METRIC, "value": speed["fp16_ms"],
         "delta": None, "seconds": None},
        {"precision": "int8", "calibrator": calibrator, "source": SOURCE, "metric": LATENCY_METRIC, "value": speed["int8_ms"],
         "delta": None, "seconds": None},
    ]
    return SparseOutcome(speed=speed, rows=rows)


def sparse_candidates(
    model: nn.Module,
    calib_data: Iterable[Any],
    *,
    calibrators: Sequence[str],
    method: str = "magnitude",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    config: Any = None,
    calib_batches: Optional[int] = None,
    calibrator_params: Optional[Dict[str, Dict[str, Any]]] = None,
    reports: Optional[list] = None,
    keep: Optional[list] = None,
) -> Callable[[Any], Iterator[Any]]:
    """An ``extra_candidates`` function for :func:`quantlab.evaluation.compare.compare`.

    Pruning and calibration happen when compare asks for the candidates (after the
    dense rows), on a copy of ``model``; one statistics pass serves every calibrator,
    and the candidates are yielded one at a time (each is evaluated before the next
    calibrator's ranges are loaded into the same copy).

    Args:
        model: The FP32 model (not modified).
        calib_data: Calibration batches (for the ranges, and for ``sparsegpt``).
        calibrators: Calibrators to give a 2:4 row.
        method / include / exclude: See :func:`quantlab.sparsity.prune`.
        reports: If a list, the :class:`~quantlab.sparsity.pruning.PruneReport` is appended to it.
        keep: If a list, the pruned, calibrated copy is appended to it (with the last
            calibrator's ranges), e.g. to time it on a GPU afterwards.
    """
    from quantlab.api import load_scales
    from quantlab.evaluation.compare import Candidate
    from quantlab.ptq import run_ptq
    from quantlab.sparsity.pruning import prune

    def candidates(_dense_ptq: Any) -> Iterator[Any]:
        pruned = copy.deepcopy(model)
        report = prune(pruned, method, include=include, exclude=exclude, data=calib_data, max_batches=calib_batches)
        if reports is not None:
            reports.append(report)
        if keep is not None:
            keep.append(pruned)
        ptq = run_ptq(pruned, calib_data, list(calibrators), config=config, max_batches=calib_batches,
                      calibrator_params=calibrator_params)
        for name in calibrators:
            load_scales(pruned, ptq.scales[name])
            yield Candidate(precision="int8", calibrator=name, source=SOURCE, model=pruned)

    return candidates


__all__ = ["LATENCY_METRIC", "QAT_SOURCE", "SOURCE", "SparseCompare", "SparseOutcome", "measure_sparse_speed", "sparse_candidates"]
