"""Errors of the jobs layer. Each names the field, run or file at fault."""
from __future__ import annotations

from quantlab.errors import QuantlabError


class JobError(QuantlabError):
    """Base class of the jobs layer's errors."""


class FieldError(JobError, ValueError):
    """A field of a job's input is not usable; the message starts with the field's name.

    Attributes:
        field: The field (``model``, ``config.max_drop``, ``eval data``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class RunDescriptionError(FieldError):
    """A :class:`quantlab.jobs.description.RunDescription` field is invalid (type, bounds, unknown key)."""


class JobInputError(FieldError):
    """A dashboard/demo job's model, data, metric or options are not usable; the message names the field."""


class RecorderError(JobError):
    """The recorder was asked for something its run cannot hold (e.g. result rows on a report)."""
