"""PTQ algorithms that change the model so INT8 keeps accuracy: the pipeline's
transform and refine stages.

* Transforms (``Stage.TRANSFORM``) run on the floating-point model, before
  quantizers are attached and before the statistics pass, and keep its FP32
  function (BatchNorm folding, cross-layer equalization, SmoothQuant).
* Refiners (``Stage.REFINE``) run on the quantized model once its ranges are
  chosen and applied (AdaRound, bias correction).

Each algorithm registers itself by name (:func:`register_algorithm`); the
pipeline runs the selected ones in stage order (:func:`parse_algorithms`).
"""
from quantlab.algorithms.base import (
    Algorithm,
    AlgorithmContext,
    AlgorithmError,
    AlgorithmReport,
    Stage,
    get_algorithm,
    list_algorithms,
    parse_algorithms,
    register_algorithm,
    run_stage,
)
from quantlab.algorithms._params import check_params, describe_params, parse_param_items, parse_value

__all__ = [
    "Algorithm", "AlgorithmContext", "AlgorithmError", "AlgorithmReport", "Stage",
    "check_params", "describe_params", "get_algorithm", "list_algorithms", "parse_algorithms", "parse_param_items",
    "parse_value", "register_algorithm", "run_stage",
]
