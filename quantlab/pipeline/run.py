"""The one PTQ pipeline: transform -> collect -> choose -> refine -> apply.

Every entry point runs it: ``quantlab.quantize`` (one calibrator), ``quantlab.ptq.run_ptq``
and the CLI (several calibrators from one statistics pass), ``quantlab.qat.prepare``
(starting ranges), torchrun jobs (the same path with a process group).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from quantlab.algorithms import Algorithm, AlgorithmReport, Stage, check_params, parse_algorithms
from quantlab.attach import QuantizerRef, attach_quantizers, get_config, is_quantized, iter_quantizers
from quantlab.calibrators import get_calibrator
from quantlab.config import QuantConfig, int8_config
from quantlab.errors import CalibrationError
from quantlab.pipeline.apply import apply, measure_weight_ranges, planned_scales, scales_of
from quantlab.pipeline.choose import Calibrators, calibrator_params, choose_all
from quantlab.pipeline.collect import collect
from quantlab.pipeline.refine import refinable_state, refine, restore_refinable_state
from quantlab.pipeline.transform import transform
from quantlab.pipeline.types import Ranges, Statistics
from quantlab.scales import Scales
from quantlab.tensor_quantizer import Role


@dataclasses.dataclass
class PTQResult:
    """What one PTQ run produced.

    Attributes:
        scales: Scales per calibrator name (same statistics for all).
        num_batches: Batches in the statistics pass.
        statistics_seconds: Wall time of the statistics pass.
        calibrate_seconds: Wall time of each calibrator (choosing, refining and applying).
        transforms: Reports of the transforms run before the pass.
        refinements: Reports of the refiners, per calibrator.
        refined_weights: Per calibrator, the float weights and biases the refiners
            left (empty without refiners); the model holds the last calibrator's.
    """

    scales: Dict[str, Scales]
    num_batches: int
    statistics_seconds: float
    calibrate_seconds: Dict[str, float]
    transforms: List[AlgorithmReport] = dataclasses.field(default_factory=list)
    refinements: Dict[str, List[AlgorithmReport]] = dataclasses.field(default_factory=dict)
    refined_weights: Dict[str, Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)

    def save(self, out_dir: "str | Path") -> Dict[str, Path]:
        """Writes ``scales.<calibrator>.json`` files; returns their paths by calibrator."""
        out = Path(out_dir)
        return {name: s.save(out / f"scales.{name}.json") for name, s in self.scales.items()}


def prepare(model: nn.Module, config: QuantConfig, forward_loop: Optional[Callable[[nn.Module], Any]] = None) -> List[AlgorithmReport]:
    """Transforms and attaches quantizers to a floating-point model (nothing if it is already quantized).

    Weight ranges are measured; inputs stay off until ranges are applied.
    Returns the transforms' reports.
    """
    if is_quantized(model):
        return []
    reports = transform(model, parse_algorithms(config.algorithms), forward_loop, config)
    attach_quantizers(model, config)
    measure_weight_ranges(model)
    return reports


def run(model: nn.Module, forward_loop: Callable[[nn.Module], Any], calibrators: Calibrators, *,
        config: Optional[QuantConfig] = None, group: Any = None, cuda_graphs: bool = True) -> PTQResult:
    """Quantizes ``model`` in place with every calibrator from ONE statistics pass.

    transform (the config's transforms, if the model is not quantized yet) ->
    collect (one pass) -> choose (each calibrator) -> refine (the config's
    refiners, per calibrator, from the same transformed weights) -> apply. The
    model is left fake-quantizing with the last calibrator's ranges.

    Args:
        model: The FP32 model (its device is used), or one already quantized.
        forward_loop: Runs the calibration batches (this rank's shard under a group).
        calibrators: Names, or name -> parameters.
        config: Quantization config (default: the model's, else :func:`int8_config`).
        group: A process group: the pass is merged exactly and the choice split
            across its ranks (collective; every rank ends with the same ranges).
        cuda_graphs: Allow CUDA-graph replay in the statistics pass.

    Raises:
        UnknownCalibratorError / AlgorithmError: bad names (before any work).
        CalibrationError: empty calibration data.
    """
    wanted = calibrator_params(calibrators)
    for name in wanted:
        get_calibrator(name)
    config = config or get_config(model) or int8_config()
    algorithms = parse_algorithms(config.algorithms)
    check_params(config.algorithms, {name: dict(p) for name, p in config.algorithm_params})
    transforms = prepare(model, config, forward_loop)
    # The quantizers, listed once for every stage (a walk of a large model's module tree costs ~1 ms of host time).
    refs = list(iter_quantizers(model))
    # Deferred: the calibrators are enqueued behind the pass, whose end is read back with the ranges.
    statistics = collect(model, forward_loop, group=group, cuda_graphs=cuda_graphs, defer=True, refs=refs)
    if statistics.num_batches == 0:
        raise CalibrationError("calibration data is empty: no batch reached the model")
    refiners = [a for a in algorithms if a.stage is Stage.REFINE]
    weight_ranges: List[torch.Tensor] = []
    if not refiners:  # the weights stay as they are: their ranges are enqueued behind the pass too
        weights = [ref for ref in refs if ref.role is Role.WEIGHT]
        measure_weight_ranges(model, weights)
        weight_ranges = [ref.quantizer.amax for ref in weights]
    # Behind a deferred pass the weights' ranges come back with the statistics (one read-back for both).
    chosen = choose_all(statistics, wanted, group=group, extra=weight_ranges)
    result = PTQResult(scales={}, num_batches=statistics.num_batches, statistics_seconds=statistics.seconds,
                       calibrate_seconds={}, transforms=transforms)
    return apply_each(model, statistics, chosen, result, refiners=refiners, forward_loop=forward_loop, config=config,
                      weights_measured=not refiners, weight_values=getattr(chosen, "extra_values", None), refs=refs)


def apply_each(model: nn.Module, statistics: Statistics, chosen: Mapping[str, Ranges], result: PTQResult, *,
               refiners: Sequence[Algorithm] = (), forward_loop: Optional[Callable[[nn.Module], Any]] = None,
               config: Optional[QuantConfig] = None, weights_measured: bool = False,
               weight_values: Optional[torch.Tensor] = None, refs: Optional[Sequence[QuantizerRef]] = None) -> PTQResult:
    """refine -> apply for each calibrator's ranges in turn; fills ``result``'s scales,
    seconds, refinements and refined weights (in the order of ``chosen``). The model is
    left with the last calibrator's.

    Args:
        weights_measured: The weights' ranges were just stored (:func:`measure_weight_ranges`)
            and the weights have not changed since (no refiners).
        weight_values: Those ranges, already read back (see :func:`apply`).
        refs: The model's quantizers, if the caller already listed them.

    Without refiners, calibrators whose ranges are in (``chosen.ready``, behind a deferred
    pass) are applied first, so the host works on them while the device still computes the
    others; the last one wanted is applied last all the same.
    """
    names = list(chosen)
    order = names
    ready = getattr(chosen, "ready", None)
    if ready is not None and not refiners and len(names) > 1:
        first = [n for n in ready if n != names[-1]]
        order = first + [n for n in names if n not in first]
    before = refinable_state(model) if refiners and len(chosen) > 1 else None
    refs = list(iter_quantizers(model)) if refs is None else list(refs)  # listed once for every calibrator
    previous: Optional[Scales] = None
    saved_statistics = statistics.saved()
    for index, name in enumerate(order):
        start = time.perf_counter()
        ranges = chosen[name]
        if before is not None and index:
            restore_refinable_state(model, before)  # every calibrator refines the same weights
        result.refinements[name] = refine(model, ranges, refiners, forward_loop, config, reference_state=before)
        # Weight ranges do not depend on the calibrator unless refiners changed the weights.
        same_weights = index > 0 and not refiners
        # Between the first calibrator (which stores the weights' ranges) and the one left in the model,
        # only the Scales are wanted: built from the ranges, with nothing stored in the quantizers.
        planned = None
        if same_weights and index < len(order) - 1 and previous is not None:
            planned = planned_scales(model, ranges, refs=refs, weights_from=previous, statistics=saved_statistics,
                                     calibrator=name, calibrator_params=ranges.params)
        if planned is None:
            stored: Dict[str, Any] = {}
            apply(model, ranges, weights=not same_weights, refs=refs, stored=stored,
                  weights_measured=weights_measured and index == 0, weight_values=weight_values)
            planned = scales_of(model, calibrator=name, calibrator_params=ranges.params, statistics=saved_statistics,
                                refs=refs, weights_from=previous if same_weights else None, held=stored)
        previous = result.scales[name] = planned
        if refiners:
            result.refined_weights[name] = refinable_state(model)
        if result.transforms or result.refinements[name]:  # the ranges fit the changed weights: say so in the file
            previous.algorithms = {"transforms": [r.to_dict() for r in result.transforms],
                                   "refinements": [r.to_dict() for r in result.refinements[name]]}
        result.calibrate_seconds[name] = ranges.seconds + time.perf_counter() - start
    if order != names:  # back in the order wanted (entries of other calibrators kept, first)
        for field in ("scales", "calibrate_seconds", "refinements"):
            held = getattr(result, field)
            setattr(result, field, {**{k: v for k, v in held.items() if k not in names}, **{n: held[n] for n in names}})
    return result
