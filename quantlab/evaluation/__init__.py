"""Evaluation: FP32 vs FP16 vs INT8 per calibrator, per-layer error, sensitivity, mixed precision.

    from quantlab.evaluation import compare, rank_layers, auto_precision
    result = compare(model, calib_loader, eval_loader, metric="top1")

Measurement only: nothing here records a run or writes a run folder (the jobs in
:mod:`quantlab.jobs` do, e.g. :func:`quantlab.jobs.compare.run_compare`).
Modules: :mod:`.tasks` (what to run and how to score it), :mod:`.compare`,
:mod:`.layers` (per-layer SQNR / cosine), :mod:`.sensitivity`,
:mod:`.autoprecision`, :mod:`.report` (rendering a run's report).
"""
from quantlab.evaluation.autoprecision import MixedPrecisionResult, auto_precision
from quantlab.evaluation.compare import Candidate, CompareResult, ResultRow, compare
from quantlab.evaluation.errors import EvaluationError, MetricError, UnknownMetricError
from quantlab.evaluation.evaluate import Evaluation, evaluate, evaluate_reference
from quantlab.evaluation.layers import LayerError, layer_errors
from quantlab.evaluation.ranking import kendall_tau_b, ranking_agreement, spearman
from quantlab.evaluation.sensitivity import SensitivityResult, full_ranking, proxy_agreement, rank_layers
from quantlab.evaluation.tasks import (
    AgreementTask,
    CausalLMTask,
    ClassificationTask,
    EmbeddingTask,
    FunctionTask,
    Task,
    register_metric,
    task_for_metric,
)

__all__ = [
    "AgreementTask", "Candidate", "CausalLMTask", "ClassificationTask", "CompareResult", "EmbeddingTask", "Evaluation", "EvaluationError",
    "FunctionTask", "LayerError", "MetricError", "MixedPrecisionResult", "ResultRow", "SensitivityResult", "Task",
    "UnknownMetricError", "auto_precision", "compare", "evaluate", "evaluate_reference", "full_ranking", "kendall_tau_b",
    "layer_errors", "proxy_agreement", "rank_layers", "ranking_agreement", "register_metric", "spearman",
    "task_for_metric",
]
