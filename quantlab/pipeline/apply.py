"""The pipeline's ``apply`` stage: put ranges into the model's quantizers; and the way
back, a :class:`~quantlab.scales.Scales` snapshot of what the model holds.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from quantlab.algorithms.input_shift import input_range
from quantlab.attach import (
    QuantizerRef,
    attach_quantizers,
    float_layers,
    get_config,
    is_quantized,
    iter_quantizers,
    original_weight,
    remove_quantizers,
)
from quantlab.calibrators import HistogramStats
from quantlab.config import int8_config
from quantlab.errors import CalibrationError, ScalesMismatchError
from quantlab.functional import amax_of_weight
from quantlab.pipeline.types import Ranges
from quantlab.scales import QuantizerScale, Scales
from quantlab.statistics import HistogramCollector
from quantlab.tensor_quantizer import QuantizerMode, Role, TensorQuantizer, quantize_all_with, store_ranges
from quantlab.validation.model_ranges import zero_weight_range_problems


def _flat_on_host(amaxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """The amax tensors (one device) end to end as one float32 CPU tensor: one copy, a few ops in all
    (per-quantizer ops cost 10-50 us each on a GPU host, and a model has a hundred quantizers)."""
    with torch.no_grad():  # learned ranges require grad
        if all(a.dim() == 0 for a in amaxes):
            flat = torch.stack(amaxes)
        else:
            flat = torch.cat([a if a.dim() == 1 else a.reshape(-1) for a in amaxes])
        return (flat if flat.dtype == torch.float32 else flat.to(torch.float32)).cpu()


def _by_device(quantizers: Sequence[TensorQuantizer]) -> Dict[torch.device, List[int]]:
    groups: Dict[torch.device, List[int]] = {}
    for i, q in enumerate(quantizers):
        groups.setdefault(q.amax.device, []).append(i)
    return groups


def amax_on_host(quantizers: List[TensorQuantizer]) -> List[torch.Tensor]:
    """Every quantizer's amax as a CPU tensor: one copy per device instead of one sync per quantizer."""
    out: List[Optional[torch.Tensor]] = [None] * len(quantizers)
    for indices in _by_device(quantizers).values():
        flat = _flat_on_host([quantizers[i].amax for i in indices])
        for i, part in zip(indices, flat.split([quantizers[i].amax.numel() for i in indices])):
            out[i] = part.reshape(quantizers[i].amax.shape)
    return out  # type: ignore[return-value]


def amax_values(quantizers: Sequence[TensorQuantizer]) -> Tuple[List[Union[float, List[float]]], List[bool]]:
    """Every quantizer's amax as Python values (a float, or a list per channel), and whether each
    is all finite: one copy per device, no per-quantizer tensor ops."""
    values: List[Any] = [None] * len(quantizers)
    finite = [True] * len(quantizers)
    for indices in _by_device(quantizers).values():
        group = [quantizers[i] for i in indices]
        for i, value, ok in zip(indices, *split_amax_values(group, _flat_on_host([q.amax for q in group]))):
            values[i], finite[i] = value, ok
    return values, finite


def split_amax_values(quantizers: Sequence[TensorQuantizer], flat_on_host: torch.Tensor) -> Tuple[List[Any], List[bool]]:
    """The quantizers' ranges from ``flat_on_host`` (a CPU tensor of all their amax values end to end,
    as read back): each as a float or a list per channel, and whether it is all finite."""
    values: List[Any] = []
    finite: List[bool] = []
    # numpy, on this thread: torch's CPU ops on a tensor this size (BERT-base: 85k weight ranges) run on the
    # intra-op thread pool, whose waking took 23-31 ms in 7 of 40 run_ptq calls on an H200 host (diagnose_tail.py).
    all_finite = bool(np.isfinite(flat_on_host.detach().numpy()).all())
    flat = flat_on_host.tolist()
    position = 0
    for q in quantizers:
        amax = q.amax
        part = flat[position:position + amax.numel()]
        position += amax.numel()
        values.append(part if amax.dim() else part[0])
        finite.append(all_finite or all(math.isfinite(v) for v in part))
    return values, finite


def measure_weight_ranges(model: nn.Module, refs: Optional[Sequence[QuantizerRef]] = None) -> None:
    """Sets every weight quantizer's range to max |w| (per channel) of the weight it quantizes."""
    weights = [ref for ref in (iter_quantizers(model) if refs is None else refs) if ref.role is Role.WEIGHT]
    store_ranges([ref.quantizer for ref in weights],
                 [amax_of_weight(original_weight(ref.module), ref.quantizer.spec) for ref in weights])


def apply(model: nn.Module, ranges: Ranges, *, weights: bool = True,
          refs: Optional[Sequence[QuantizerRef]] = None, stored: Optional[Dict[str, Any]] = None,
          weights_measured: bool = False, weight_values: Optional[torch.Tensor] = None) -> List[str]:
    """Makes the model fake-quantize with ``ranges`` (inputs) and its weights' ranges.

    Args:
        model: The quantized model.
        ranges: From ``choose``. An input tensor without a range (no calibration
            batch reached it) is left in floating point, with a warning.
        weights: Measure the weights' ranges again (False keeps those the model
            holds, when the weights have not changed since they were measured).
        refs: The model's quantizers, if the caller already listed them.
        stored: Filled with quantizer key -> the range it now holds (as its float32
            buffer holds it: a float, or a list per channel) for every range stored
            here, for :func:`scales_of` without reading them back.
        weights_measured: :func:`measure_weight_ranges` has just stored the weights'
            ranges (enqueued earlier, e.g. behind a deferred pass): check and use
            them instead of measuring again.
        weight_values: With ``weights_measured``, those ranges already read back (a CPU
            float32 tensor of every weight quantizer's amax end to end, in the order of
            ``refs``): no read-back here.

    Returns:
        The layers whose inputs stay in floating point (unreached).

    Raises:
        CalibrationError: a weight holds NaN/Inf, or a range is not finite.
    """
    refs = list(iter_quantizers(model)) if refs is None else list(refs)
    weight_refs = [r for r in refs if r.role is Role.WEIGHT]
    if weights or weights_measured or not all(r.quantizer.mode is QuantizerMode.QUANTIZE for r in weight_refs):
        if not weights_measured:
            measure_weight_ranges(model, weight_refs)
        # One read-back for every weight range, not a synchronizing check per quantizer.
        weight_quantizers = [r.quantizer for r in weight_refs]
        read = (split_amax_values(weight_quantizers, weight_values) if weights_measured and weight_values is not None
                else amax_values(weight_quantizers))
        for ref, value, finite in zip(weight_refs, *read):
            if not finite:
                raise CalibrationError(f"the weights of '{ref.module_name}' contain NaN or Inf: no range can be chosen")
            ref.quantizer.quantize_with(verified=True)
            if stored is not None:
                stored[ref.key] = value
    plan = plan_inputs(refs, ranges)
    for ref in plan.off:
        ref.quantizer.off()
    held = quantize_all_with([ref.quantizer for ref in plan.quantized], plan.amaxes)
    if stored is not None:
        stored.update((ref.key, value) for ref, value in zip(plan.quantized, held))
    return plan.unreached


@dataclasses.dataclass
class InputPlan:
    """What :func:`apply` does with each input quantizer for one calibrator's ranges.

    Attributes:
        quantized: The input quantizers that get a range, in the model's order.
        amaxes: Their ranges as Python floats: the calibrator's, or the layer's input shift.
        off: The input quantizers left in floating point.
        unreached: Their layers that no calibration batch reached.
    """

    quantized: List[QuantizerRef]
    amaxes: List[float]
    off: List[QuantizerRef]
    unreached: List[str]


def plan_inputs(refs: Sequence[QuantizerRef], ranges: Ranges) -> InputPlan:
    """Decides, without changing anything, what each input quantizer gets from ``ranges``; warns about
    the inputs left in floating point (no data reached them, or only zeros: a zero range would
    quantize every value to 0, see validation/numeric.py).

    Raises:
        CalibrationError: the calibrator chose a NaN or infinite range.
    """
    plan = InputPlan([], [], [], [])
    zero_range: List[str] = []
    for ref in refs:
        if ref.role is not Role.INPUT:
            continue
        amax = ranges.inputs.get(ref.module_name)
        if amax is None:
            plan.unreached.append(ref.module_name)
            plan.off.append(ref)
            continue
        if not math.isfinite(amax):
            raise CalibrationError(f"calibrator {ranges.calibrator!r} chose amax {amax} for the input of '{ref.module_name}'")
        if not amax > 0:
            zero_range.append(ref.module_name)
            plan.off.append(ref)
            continue
        plan.quantized.append(ref)
        plan.amaxes.append(input_range(ref.module, float(amax)))
    for amax, ref in zip(plan.amaxes, plan.quantized):  # an input shift is checked as quantize_all_with checks
        if not math.isfinite(amax):
            raise CalibrationError(f"quantizer '{ref.quantizer.name}' ({ref.role.value}): amax {amax} is not finite")
    if zero_range:
        warnings.warn(
            f"{len(zero_range)} quantized layer(s) saw only zeros at their input during calibration and keep "
            "floating-point inputs (a zero range would turn every value into 0): "
            + ", ".join(zero_range[:10]) + (" ..." if len(zero_range) > 10 else ""),
            stacklevel=3,
        )
    if plan.unreached:
        warnings.warn(
            f"{len(plan.unreached)} quantized layer(s) received no calibration data and keep floating-point inputs: "
            + ", ".join(plan.unreached[:10]) + (" ..." if len(plan.unreached) > 10 else ""),
            stacklevel=3,
        )
    return plan


def planned_scales(model: nn.Module, ranges: Ranges, *, refs: Sequence[QuantizerRef], weights_from: Scales,
                   statistics: Dict[str, HistogramStats], calibrator: str = "",
                   calibrator_params: Optional[Dict[str, Any]] = None) -> Optional[Scales]:
    """What :func:`apply` with ``ranges`` (weights kept) and then :func:`scales_of` would return, without
    applying anything: the model keeps the ranges it holds. ``calibrator``, ``calibrator_params``
    and ``statistics`` are recorded as :func:`scales_of` records them.

    For a run of several calibrators, whose every calibrator but the one left in the model needs
    only its Scales (applying stores a range in every quantizer: host time after the statistics
    are read back, which nothing overlaps). Needs the state those two calls would find and leave:
    every weight quantizing with the range ``weights_from`` holds for it, and no layer kept in
    floating point; None otherwise (the caller applies).

    Raises:
        CalibrationError: as :func:`apply`, for a NaN or infinite range.
    """
    if weights_from.float_layers:
        return None
    weight_entries = {e.key: e for e in weights_from.entries if e.role is Role.WEIGHT}
    if any(r.role is Role.WEIGHT and (r.key not in weight_entries or r.quantizer.mode is not QuantizerMode.QUANTIZE)
           for r in refs):
        return None
    plan = plan_inputs(refs, ranges)
    # The float32 roundings the quantizers' buffers would hold (as quantize_all_with returns them).
    held = dict(zip((r.key for r in plan.quantized), torch.tensor(plan.amaxes, dtype=torch.float32).tolist()))
    entries = []
    for ref in refs:
        if ref.role is Role.WEIGHT:
            entries.append(weight_entries[ref.key])
        elif ref.key in held:
            entries.append(_entry(ref, held[ref.key]))
    return _snapshot(model, entries, calibrator, calibrator_params, statistics, float_layers=[])


def _entry(ref: QuantizerRef, amax: Any) -> QuantizerScale:
    """The scales entry of ``ref``'s quantizer holding ``amax``."""
    spec = ref.quantizer.spec
    return QuantizerScale(module=ref.module_name, role=ref.role.value, amax=amax, num_bits=spec.num_bits,
                          narrow_range=spec.narrow_range, axis=spec.axis)


def _snapshot(model: nn.Module, entries: List[QuantizerScale], calibrator: str,
              calibrator_params: Optional[Dict[str, Any]], statistics: Dict[str, HistogramStats],
              float_layers: List[str]) -> Scales:
    """The :class:`Scales` of ``model`` with these entries (what :func:`scales_of` and :func:`planned_scales` return)."""
    return Scales(entries=entries, calibrator=calibrator, calibrator_params=dict(calibrator_params or {}),
                  statistics=dict(statistics), config=get_config(model), float_layers=float_layers,
                  model=type(model).__name__)


def scales_of(
    model: nn.Module,
    *,
    calibrator: str = "",
    calibrator_params: Optional[Dict[str, Any]] = None,
    statistics: Optional[Dict[str, HistogramStats]] = None,
    refs: Optional[Sequence[QuantizerRef]] = None,
    weights_from: Optional[Scales] = None,
    held: Optional[Dict[str, Any]] = None,
) -> Scales:
    """A :class:`Scales` snapshot of the ranges the model holds now.

    Args:
        model: The quantized model.
        calibrator: Who chose the input ranges (recorded).
        calibrator_params: Its parameters (recorded).
        statistics: Histograms to save with the scales (default: those the
            model's input quantizers hold).
        refs: The model's quantizers, if the caller already listed them.
        weights_from: A snapshot taken since the weights' ranges last changed:
            its weight entries are reused instead of read back again.
        held: Quantizer key -> the range :func:`apply` just stored (its ``stored``):
            used instead of reading those ranges back from the device.
    """
    entries = []
    refs = list(iter_quantizers(model)) if refs is None else list(refs)
    kept_float = float_layers(model, refs)
    reused = {e.key: e for e in weights_from.entries if e.role is Role.WEIGHT} if weights_from is not None else {}
    known = {r.key: (held[r.key], True) for r in refs
             if held and r.key in held and r.key not in reused and r.quantizer.mode is QuantizerMode.QUANTIZE}
    read = [r for r in refs if not (r.role is Role.WEIGHT and r.key in reused) and r.key not in known]
    on_host = dict(zip((r.key for r in read), zip(*amax_values([r.quantizer for r in read]))))
    on_host.update(known)
    for ref in refs:
        if ref.key in reused:
            if ref.module_name not in kept_float:
                entries.append(reused[ref.key])
            continue
        amax, finite = on_host[ref.key]
        if ref.module_name in kept_float:
            continue
        if not finite or (ref.role is Role.INPUT and ref.quantizer.mode is QuantizerMode.OFF):
            continue
        entries.append(_entry(ref, amax))
    if statistics is None:
        statistics = {}
        for ref in refs:
            if ref.role is Role.INPUT and ref.quantizer.collector is not None:
                stats = ref.quantizer.collector.stats()
                if stats is not None:
                    statistics[ref.module_name] = stats
    return _snapshot(model, entries, calibrator, calibrator_params, statistics, float_layers=kept_float)


def apply_scales(model: nn.Module, scales: Union[str, Path, Scales], *, strict: bool = True) -> nn.Module:
    """Loads ranges into ``model`` (attaching quantizers with the file's config first if needed).

    Args:
        model: The model; quantized in place if it has no quantizers yet.
        scales: A :class:`Scales` or the path of a scales file.
        strict: Require every quantizer of the model to have a range in the file
            and every range in the file to have a quantizer in the model.

    Raises:
        ScalesFormatError: the file is not a valid scales file.
        ScalesMismatchError: layer names, roles or channel counts do not match;
            the message lists every mismatch. The model is left unchanged.
    """
    source = str(scales) if not isinstance(scales, Scales) else "<scales>"
    if not isinstance(scales, Scales):
        scales = Scales.load(scales)
    attached_here = False
    if not is_quantized(model):
        attach_quantizers(model, scales.config or int8_config())
        attached_here = True
    refs = {r.key: r for r in iter_quantizers(model)}
    wanted = scales.as_dict()
    problems: List[str] = []
    for key, entry in wanted.items():
        ref = refs.get(key)
        if ref is None:
            problems.append(f"'{key}' is in the scales file but the model has no such quantizer")
            continue
        expected = tuple(ref.quantizer.amax.shape)
        got = (len(entry.amax),) if isinstance(entry.amax, list) else ()
        if got != expected:
            problems.append(f"'{key}': scales hold {got or 'one value'} but the layer needs {expected or 'one value'}")
        elif ref.role is Role.WEIGHT:
            problems += zero_weight_range_problems(key, entry.amax, ref.module, ref.quantizer.spec)
    floats = set(scales.float_layers)
    known = {r.module_name for r in refs.values()}
    if attached_here:  # the file's config excludes its float layers (a saved mixed config): they exist, unquantized
        known |= {name for name, _ in model.named_modules()}
    unknown_floats = sorted(floats - known)
    problems += [f"float layer '{m}' is not a quantized layer of the model" for m in unknown_floats]
    if strict:
        for key, ref in refs.items():
            if key in wanted or ref.module_name in floats:
                continue
            # An input without a scale is allowed beside its layer's weight scale: that layer
            # got no calibration data and kept floating-point inputs when it was calibrated.
            if ref.role is Role.INPUT and f"{ref.module_name}:{Role.WEIGHT.value}" in wanted:
                continue
            problems.append(f"'{key}' has no scale in the file")
    if problems:
        if attached_here:
            remove_quantizers(model)
        shown = "\n  ".join(problems[:30]) + ("\n  ..." if len(problems) > 30 else "")
        raise ScalesMismatchError(f"scales {source} do not match {type(model).__name__} ({len(problems)} problem(s)):\n  {shown}")
    for key, entry in wanted.items():
        ref = refs[key]
        if ref.role is Role.INPUT:
            ref.quantizer.collector = (
                HistogramCollector.from_stats(scales.statistics[entry.module], ref.quantizer.num_bins, entry.module)
                if entry.module in scales.statistics
                else None
            )
        ref.quantizer.quantize_with(entry.amax)
    for key, ref in refs.items():
        if key not in wanted and (ref.role is Role.INPUT or ref.module_name in floats):
            ref.quantizer.off()  # kept in floating point (mixed precision, non-strict)
    return model
