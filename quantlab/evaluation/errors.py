"""Errors of the evaluation layer (tasks, metrics, comparison)."""
from __future__ import annotations

from quantlab.errors import QuantlabError


class EvaluationError(QuantlabError):
    """A model's outputs or the eval data do not fit the task (wrong shape, no labels, ...)."""


class MetricError(EvaluationError):
    """A metric (built-in or user function) failed or returned something that is not a number."""


class UnknownMetricError(EvaluationError, ValueError):
    """The metric name is not a built-in metric and not a ``module:function`` spec."""
