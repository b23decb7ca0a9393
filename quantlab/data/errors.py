"""Exceptions raised by the data layer.

They subclass built-in exceptions so callers that already catch
``FileNotFoundError``/``ValueError``/``ConnectionError`` keep working.
"""

from __future__ import annotations

from quantlab.errors import QuantlabError

FMNIST_INSTALL_HINT = "sudo apt-get install --no-install-recommends dataset-fashion-mnist"


class DataNotFoundError(FileNotFoundError):
    """A data file or directory that a spec names does not exist."""


class CorruptDataError(QuantlabError, ValueError):
    """A data file exists but its content is malformed (bad header, truncated)."""


class EmptyDataError(QuantlabError, ValueError):
    """A data spec resolved to zero samples."""


class HubUnreachableError(ConnectionError):
    """A ``hub:`` dataset could not be fetched (offline, blocked, or unknown name)."""


class DataShapeError(QuantlabError, ValueError):
    """Samples (or a batch and the model) do not agree on a shape; names the spec, sample and shapes."""
