"""Errors of the deployment path (ONNX export, checks, calibration caches).

Each names the offending file, layer, node or tensor.
"""
from __future__ import annotations

from quantlab.errors import FileFormatError, QuantlabError


class ExportError(QuantlabError):
    """A model could not be exported (missing scales, unsupported quantizer, exporter failure)."""


class OnnxFormatError(QuantlabError, ValueError):
    """A file is not a readable ONNX model (wrong format, truncated, fails the checker)."""


class CacheFormatError(FileFormatError):
    """A calibration cache file is not in TensorRT's text format."""


class TensorMappingError(QuantlabError):
    """Quantizers of a scales file could not be matched to tensors of an ONNX graph."""


__all__ = ["ExportError", "OnnxFormatError", "CacheFormatError", "TensorMappingError"]
