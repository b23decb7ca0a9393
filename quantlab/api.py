"""The user-facing verbs: quantize, calibrate, load_scales."""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import nn

from quantlab.attach import attach_quantizers, collect_statistics, float_layers, is_quantized, iter_quantizers
from quantlab.calibrators import HistogramStats, get_calibrator
from quantlab.config import QuantConfig, int8_config
from quantlab.errors import CalibrationError, ScalesMismatchError
from quantlab.functional import amax_of_weight
from quantlab.scales import QuantizerScale, Scales, choose_amax
from quantlab.statistics import HistogramCollector
from quantlab.tensor_quantizer import QuantizerMode
from quantlab.validation.model_ranges import zero_weight_range_problems

_CONFIG_ATTR = "_quantlab_config"


def get_config(model: nn.Module) -> Optional[QuantConfig]:
    """The config ``model`` was quantized with, if quantlab quantized it."""
    return model.__dict__.get(_CONFIG_ATTR)


def quantize(
    model: nn.Module,
    config: Optional[QuantConfig] = None,
    forward_loop: Optional[Callable[[nn.Module], Any]] = None,
) -> nn.Module:
    """Quantizes ``model`` in place and returns it.

    Attaches quantizers to every selected quantizable layer. With a
    ``forward_loop``, runs it once to collect activation statistics and applies
    ``config.calibrator``; afterwards :func:`calibrate` can choose ranges with
    any other calibrator from the same statistics, without another pass.

    Args:
        model: Any ``nn.Module``; its device is kept.
        config: What and how to quantize (default :func:`int8_config`).
        forward_loop: ``forward_loop(model)`` runs calibration batches through it.

    Returns:
        The same ``model``, quantized (or with quantizers off if no forward_loop).
    """
    config = config or int8_config()
    if not is_quantized(model):
        attach_quantizers(model, config)
        model.__dict__[_CONFIG_ATTR] = config
    _calibrate_weights(model)
    if forward_loop is not None:
        collect_statistics(model, forward_loop)
        calibrate(model, config.calibrator, **dict(config.calibrator_params))
    return model


def amax_on_host(quantizers: List[Any]) -> List[torch.Tensor]:
    """Every quantizer's amax as a CPU tensor: one copy per device instead of one sync per quantizer."""
    out: List[Optional[torch.Tensor]] = [None] * len(quantizers)
    by_device: Dict[torch.device, List[int]] = {}
    for i, q in enumerate(quantizers):
        by_device.setdefault(q.amax.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([quantizers[i].amax.detach().reshape(-1).to(torch.float32) for i in indices]).cpu()
        for i, part in zip(indices, flat.split([quantizers[i].amax.numel() for i in indices])):
            out[i] = part.reshape(quantizers[i].amax.shape)
    return out  # type: ignore[return-value]


def choose_input_amax(fn: Callable[..., float], stats: Optional[HistogramStats], quantizer: Any,
                      params: Dict[str, Any]) -> float:
    """The range calibrator ``fn`` chooses for an input quantizer (0 if it saw only zeros)."""
    return 0.0 if stats is None else choose_amax(fn, stats, quantizer.spec.num_bits, **params)


def _calibrate_weights(model: nn.Module) -> None:
    for ref in iter_quantizers(model):
        if ref.role == "weight":
            q = ref.quantizer
            original = ref.module.parametrizations[_weight_name(ref.module)].original
            q.set_amax(amax_of_weight(original, q.spec))


def _weight_name(module: nn.Module) -> str:
    return next(iter(module.parametrizations.keys()))


def collected_statistics(model: nn.Module) -> Dict[str, HistogramStats]:
    """Activation statistics gathered by the last statistics pass, by module name."""
    out = {}
    for ref in iter_quantizers(model):
        if ref.role == "input" and ref.quantizer.collector is not None:
            stats = ref.quantizer.collector.stats()
            if stats is not None:
                out[ref.module_name] = stats
    return out


def calibrate(model: nn.Module, calibrator: str = "entropy", **params: Any) -> Scales:
    """Chooses every activation range with ``calibrator`` from the collected statistics.

    Weights get per-channel (or per-tensor) max ranges from the weights themselves.
    The model is left fake-quantizing with the new ranges.

    Raises:
        UnknownCalibratorError: for an unregistered name.
        CalibrationError: if no statistics were collected (empty calibration data).
    """
    return apply_calibrator(model, calibrator, params)


def apply_calibrator(model: nn.Module, calibrator: str, params: Dict[str, Any],
                     chosen: Optional[Dict[str, float]] = None, *, weights: bool = True) -> Scales:
    """:func:`calibrate`, taking the activation ranges in ``chosen`` (by module name) as
    already chosen by ``calibrator`` (e.g. on another rank) instead of choosing them again.

    With ``weights=False`` the weight ranges the model holds are kept (the
    weights have not changed since they were last computed).
    """
    fn = get_calibrator(calibrator)
    refs = list(iter_quantizers(model))
    inputs = [r for r in refs if r.role == "input"]
    if not inputs:
        raise CalibrationError("the model has no quantizers: call quantlab.quantize(model, ...) first")
    if all(r.quantizer.collector is None for r in inputs):
        raise CalibrationError("no statistics collected yet: pass forward_loop to quantlab.quantize (or run collect_statistics)")
    if all(r.quantizer.collector is None or r.quantizer.collector.num_batches == 0 for r in inputs):
        raise CalibrationError("calibration data is empty: no batch reached any quantized layer")
    weight_refs = [r for r in refs if r.role == "weight"]
    if weights or not all(r.quantizer.mode is QuantizerMode.QUANTIZE for r in weight_refs):
        _calibrate_weights(model)
    # One read-back for every weight range, not a synchronizing check per quantizer.
    for ref, amax in zip(weight_refs, amax_on_host([r.quantizer for r in weight_refs])):
        if not bool(torch.isfinite(amax).all()):
            raise CalibrationError(f"the weights of '{ref.module_name}' contain NaN or Inf: no range can be chosen")
        ref.quantizer.mode = QuantizerMode.QUANTIZE
    unreached: List[str] = []
    zero_range: List[str] = []
    statistics: Dict[str, HistogramStats] = {}
    for ref in refs:
        q = ref.quantizer
        if ref.role == "weight":
            continue
        collector: Optional[HistogramCollector] = q.collector
        if collector is None or collector.num_batches == 0:
            unreached.append(ref.module_name)
            q.set_mode(QuantizerMode.OFF)
            continue
        stats = collector.stats()
        if chosen is not None and ref.module_name in chosen:
            amax = chosen[ref.module_name]
        else:
            amax = choose_input_amax(fn, stats, q, params)
        if stats is not None:
            statistics[ref.module_name] = stats
        if not math.isfinite(amax):
            raise CalibrationError(f"calibrator {calibrator!r} chose amax {amax} for the input of '{ref.module_name}'")
        if not amax > 0:  # only zeros seen: a zero range would quantize every value to 0 (validation/numeric.py)
            zero_range.append(ref.module_name)
            q.set_mode(QuantizerMode.OFF)
            continue
        q.set_amax(float(amax))
        q.mode = QuantizerMode.QUANTIZE  # amax checked finite on the host just above
    if zero_range:
        warnings.warn(
            f"{len(zero_range)} quantized layer(s) saw only zeros at their input during calibration and keep "
            "floating-point inputs (a zero range would turn every value into 0): "
            + ", ".join(zero_range[:10]) + (" ..." if len(zero_range) > 10 else ""),
            stacklevel=2,
        )
    if unreached:
        warnings.warn(
            f"{len(unreached)} quantized layer(s) received no calibration data and keep floating-point inputs: "
            + ", ".join(unreached[:10]) + (" ..." if len(unreached) > 10 else ""),
            stacklevel=2,
        )
    return current_scales(model, calibrator=calibrator, calibrator_params=params, statistics=statistics)


def current_scales(
    model: nn.Module,
    *,
    calibrator: str = "",
    calibrator_params: Optional[Dict[str, Any]] = None,
    statistics: Optional[Dict[str, HistogramStats]] = None,
) -> Scales:
    """A :class:`Scales` snapshot of the ranges the model holds now."""
    entries = []
    kept_float = float_layers(model)
    refs = list(iter_quantizers(model))
    for ref, amax in zip(refs, amax_on_host([r.quantizer for r in refs])):
        q = ref.quantizer
        if ref.module_name in kept_float:
            continue
        if not bool(torch.isfinite(amax).all()) or (ref.role == "input" and q.mode is QuantizerMode.OFF):
            continue
        entries.append(
            QuantizerScale(
                module=ref.module_name,
                role=ref.role,
                amax=amax.tolist() if q.spec.axis is not None else float(amax),
                num_bits=q.spec.num_bits,
                narrow_range=q.spec.narrow_range,
                axis=q.spec.axis,
            )
        )
    return Scales(
        entries=entries,
        calibrator=calibrator,
        calibrator_params=dict(calibrator_params or {}),
        statistics=dict(statistics if statistics is not None else collected_statistics(model)),
        config=get_config(model),
        float_layers=kept_float,
        model=type(model).__name__,
    )


def load_scales(model: nn.Module, scales: Union[str, Path, Scales], *, strict: bool = True) -> nn.Module:
    """Loads ranges into ``model`` (quantizing it first with the file's config if needed).

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
        quantize(model, scales.config or int8_config())
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
        elif ref.role == "weight":
            problems += zero_weight_range_problems(key, entry.amax, ref.module, ref.quantizer.spec)
    floats = set(scales.float_layers)
    unknown_floats = sorted(floats - {r.module_name for r in refs.values()})
    problems += [f"float layer '{m}' is not a quantized layer of the model" for m in unknown_floats]
    if strict:
        for key, ref in refs.items():
            if key in wanted or ref.module_name in floats:
                continue
            # An input without a scale is allowed beside its layer's weight scale: that layer
            # got no calibration data and kept floating-point inputs when it was calibrated.
            if ref.role == "input" and f"{ref.module_name}:weight" in wanted:
                continue
            problems.append(f"'{key}' has no scale in the file")
    if problems:
        if attached_here:
            from quantlab.attach import remove_quantizers

            remove_quantizers(model)
            model.__dict__.pop(_CONFIG_ATTR, None)
        shown = "\n  ".join(problems[:30]) + ("\n  ..." if len(problems) > 30 else "")
        raise ScalesMismatchError(f"scales {source} do not match {type(model).__name__} ({len(problems)} problem(s)):\n  {shown}")
    for key, entry in wanted.items():
        ref = refs[key]
        ref.quantizer.set_amax(entry.amax)
        if ref.role == "input":
            ref.quantizer.collector = (
                HistogramCollector.from_stats(scales.statistics[entry.module], ref.quantizer.num_bins, entry.module)
                if entry.module in scales.statistics
                else None
            )
        ref.quantizer.set_mode(QuantizerMode.QUANTIZE)
    for key, ref in refs.items():
        if key not in wanted and (ref.role == "input" or ref.module_name in floats):
            ref.quantizer.set_mode(QuantizerMode.OFF)  # kept in floating point (mixed precision, non-strict)
    return model


def set_quantizer_amax(model: nn.Module, module_name: str, role: str, amax: Any) -> None:
    """Sets one quantizer's range by module name and role."""
    for ref in iter_quantizers(model):
        if ref.module_name == module_name and ref.role == role:
            ref.quantizer.set_amax(amax)
            return
    raise KeyError(f"no {role} quantizer on module '{module_name}'")


__all__ = ["quantize", "calibrate", "load_scales", "current_scales", "collected_statistics", "get_config", "set_quantizer_amax"]
