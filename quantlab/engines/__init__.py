"""Inference engines built from quantlab's ONNX files (TensorRT).

See :mod:`quantlab.engines.tensorrt`; it imports ``tensorrt`` only when a build runs.
"""
