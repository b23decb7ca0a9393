"""ONNX Runtime on the CPU: the runner, and the integer-kernel forms chosen per CPU.

* :mod:`.runner`: :class:`OnnxRuntimeRunner` (loads a session, verifies its integer kernels, runs).
* :mod:`.forms`: which INT8 form (u8s8, u8u8, qdq-float) is exact on this CPU (detect + probe, cached).
* :mod:`.probe`: the worst-case integer probe run through ONNX Runtime.
* :mod:`.verify`: the integer kernels an ONNX file will run, checked against this CPU's forms.
"""
