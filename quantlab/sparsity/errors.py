"""Errors of the sparsity package; each names the layer or pattern at fault."""
from __future__ import annotations

from quantlab.errors import QuantlabError


class SparsityError(QuantlabError, ValueError):
    """A layer cannot be pruned as asked, or a selection pattern matches nothing."""


__all__ = ["SparsityError"]
