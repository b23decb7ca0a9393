"""The pipeline's ``transform`` stage: algorithms that change the floating-point model
before quantizers are attached (BatchNorm folding, equalization, smoothing), keeping
its FP32 function. The algorithms live in :mod:`quantlab.algorithms`."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

from torch import nn

from quantlab.algorithms import Algorithm, AlgorithmReport, Stage, run_stage


def transform(model: nn.Module, algorithms: Sequence[Algorithm], forward_loop: Optional[Callable[[nn.Module], Any]] = None,
              config: Any = None) -> List[AlgorithmReport]:
    """Runs the transforms among ``algorithms`` on ``model`` in place, in pipeline order.

    Args:
        model: The floating-point model (no quantizers yet).
        algorithms: Parsed algorithms (:func:`quantlab.algorithms.parse_algorithms`); refiners are skipped.
        forward_loop: Calibration batches, for transforms that measure activations.
        config: The run's :class:`~quantlab.config.QuantConfig` (algorithm parameters).
    """
    params = {a.name: config.params_of(a.name) for a in algorithms} if config is not None else None
    return run_stage(model, algorithms, Stage.TRANSFORM, forward_loop=forward_loop, params=params, config=config)
