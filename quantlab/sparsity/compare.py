"""The "2:4 + INT8" rows of a comparison: prune a copy, calibrate it, evaluate it beside FP32/FP16/INT8.

    from quantlab.evaluation.compare import compare
    from quantlab.sparsity.compare import sparse_candidates
    result = compare(model, calib, eval_data, extra_candidates=sparse_candidates(model, calib, calibrators=["entropy"]))

Rows carry ``source="sparse"`` (the dashboard labels them "2:4 + INT8 <calibrator>"); the
accuracy is the fake-quant model's (one-shot pruning + PTQ: sparse QAT, ``quantlab qat
--sparsity 2:4``, is what recovers it). Speed is measured where a GPU with cuSPARSELt runs
the pruned INT8 model (:mod:`quantlab.runtimes.cusparselt`).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence

from torch import nn

SOURCE = "sparse"
QAT_SOURCE = "sparse-qat"


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


__all__ = ["QAT_SOURCE", "SOURCE", "sparse_candidates"]
