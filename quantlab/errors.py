"""Exceptions quantlab raises for bad input. Each names the offending file, layer or tensor."""
from __future__ import annotations


class QuantlabError(Exception):
    """Base class of every error quantlab raises on purpose."""


class ConfigError(QuantlabError, ValueError):
    """A configuration value is invalid."""


class NothingToQuantizeError(QuantlabError):
    """The model has no module that quantlab knows how to quantize."""


class CalibrationError(QuantlabError):
    """Calibration could not produce a range (empty data, no statistics, ...)."""


class NonFiniteActivationError(CalibrationError):
    """A NaN or Inf reached a quantizer while statistics were collected."""


class FileFormatError(QuantlabError, ValueError):
    """A file quantlab reads does not hold what it must (structure, types, bounds); names the file and field."""


class ScalesFormatError(FileFormatError):
    """A scales file is not a valid quantlab scales artifact."""


class ScalesMismatchError(QuantlabError):
    """A scales file does not fit the model it is loaded into."""


class OutputPathError(QuantlabError, ValueError):
    """An output path cannot be written safely (it is an input, a folder, not writable, ...); checked before any work."""
