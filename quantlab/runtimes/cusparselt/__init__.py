"""2:4 sparse INT8 runner on cuSPARSELt, with dense INT8 / FP16 beside it for comparison.

    from quantlab.runtimes.cusparselt import convert_linears, prepare_plans
    convert_linears(fake_quant_model.cuda(), "sparse-int8")   # nn.Linear -> SparseInt8Linear (2:4 weights)
    prepare_plans(model, tokens=batch * seq)                   # plans + cuSPARSELt's search, once per shape
    y = model(x.half())                                        # one quantize kernel + one cusparseLtMatmul per layer

Needs an NVIDIA GPU (Ampere or newer), cuSPARSELt (``nvidia-cusparselt-cu13``/``-cu12``,
a dependency of PyTorch's CUDA wheels) with its header, and a C++ compiler: a small C
shim (``shim.cpp``) is built against the library on first use. Where any is missing,
:func:`load_library` raises :class:`CuSparseLtUnavailableError` naming what and how to
get it; importing this package works everywhere.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CuSparseLtError": "quantlab.runtimes.cusparselt.library",
    "CuSparseLtUnavailableError": "quantlab.runtimes.cusparselt.library",
    "cusparselt_available": "quantlab.runtimes.cusparselt.library",
    "find_cusparselt": "quantlab.runtimes.cusparselt.library",
    "load_library": "quantlab.runtimes.cusparselt.library",
    "DenseInt8Linear": "quantlab.runtimes.cusparselt.linear",
    "Int8LinearParams": "quantlab.runtimes.cusparselt.linear",
    "SparseInt8Linear": "quantlab.runtimes.cusparselt.linear",
    "SparsePlan": "quantlab.runtimes.cusparselt.linear",
    "ConversionError": "quantlab.runtimes.cusparselt.convert",
    "convert_linears": "quantlab.runtimes.cusparselt.convert",
    "int8_params": "quantlab.runtimes.cusparselt.convert",
    "prepare_plans": "quantlab.runtimes.cusparselt.convert",
    "check_layer": "quantlab.runtimes.cusparselt.verify",
    "dequantization_bound": "quantlab.runtimes.cusparselt.bounds",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantlab.runtimes.cusparselt' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
