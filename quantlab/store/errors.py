"""Errors of the run store. Each names the store file or the run id."""
from __future__ import annotations

from quantlab.errors import QuantlabError


class StoreError(QuantlabError):
    """The run store could not do what was asked (bad row, locked too long, ...)."""


class StoreFormatError(StoreError):
    """The store file is not SQLite, not a quantlab store, or from a newer quantlab."""


class RunNotFoundError(StoreError, KeyError):
    """No run with the given id (or run folder) is in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunFinishedError(StoreError):
    """The run is already done, failed or interrupted: its record is final."""
