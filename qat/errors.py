"""Errors raised by quantlab.qat (all subclass :class:`quantlab.errors.QuantlabError`)."""
from __future__ import annotations

from quantlab.errors import QuantlabError


class QATError(QuantlabError):
    """A QAT option, checkpoint or model state is unusable."""


class NonFiniteLossError(QATError):
    """The training loss became NaN or Inf; the message names the step and the last good checkpoint."""


class MissingDependencyError(QuantlabError, ImportError):
    """An optional dependency (lightning, transformers) is not installed; the message says what to install."""


def missing_dependency(package: str, extra: str, feature: str) -> MissingDependencyError:
    """The error for a missing optional package, with the pip command that installs it."""
    return MissingDependencyError(
        f"{feature} needs the '{package}' package, which is not installed: "
        f"pip install 'quantlab[{extra}]'  (or pip install {package})"
    )
