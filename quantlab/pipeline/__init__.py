"""The one PTQ pipeline every entry point runs (API, CLI, QAT, torchrun, dashboard)::

    transform(model)             BN folding, equalization, smoothing       (quantlab.algorithms)
      -> collect(model, loop)    ONE statistics pass; exact across ranks with a group
      -> choose(stats, name)     pure: statistics -> ranges                 (quantlab.calibrators)
      -> refine(model, ranges)   bias correction, learned rounding          (quantlab.algorithms)
      -> apply(model, ranges)    ranges into the quantizers

:func:`run` chains them for several calibrators from one pass.
"""
from quantlab.pipeline.apply import amax_on_host, apply, apply_scales, measure_weight_ranges, scales_of
from quantlab.pipeline.choose import calibrator_params, choose, choose_all
from quantlab.pipeline.collect import collect, statistics_of
from quantlab.pipeline.refine import refine
from quantlab.pipeline.run import PTQResult, apply_each, prepare, run
from quantlab.pipeline.transform import transform
from quantlab.pipeline.types import Ranges, Statistics

__all__ = [
    "PTQResult", "Ranges", "Statistics", "amax_on_host", "apply", "apply_scales", "calibrator_params", "choose",
    "apply_each", "choose_all", "collect", "measure_weight_ranges", "prepare", "refine", "run", "scales_of", "statistics_of",
    "transform",
]
