"""Which tensor of a layer a quantizer quantizes."""
from __future__ import annotations

import enum


class Role(str, enum.Enum):
    """A quantizer's role; compares equal to (and serializes as) its string value."""

    INPUT = "input"  #: the layer's input activation, per tensor
    WEIGHT = "weight"  #: the layer's weight, per output channel (or per tensor)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
