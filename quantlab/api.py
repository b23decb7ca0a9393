"""The user-facing verbs: quantize, calibrate, load_scales. Thin over :mod:`quantlab.pipeline`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from torch import nn

from quantlab.attach import get_config, iter_quantizers
from quantlab.calibrators import HistogramStats
from quantlab.config import QuantConfig, int8_config
from quantlab.errors import CalibrationError
from quantlab.pipeline import apply, apply_scales, choose, prepare, run, scales_of, statistics_of
from quantlab.scales import Scales
from quantlab.tensor_quantizer import Role


def quantize(
    model: nn.Module,
    config: Optional[QuantConfig] = None,
    forward_loop: Optional[Callable[[nn.Module], Any]] = None,
) -> nn.Module:
    """Quantizes ``model`` in place and returns it.

    Runs the config's transforms (:mod:`quantlab.algorithms`) and attaches
    quantizers to every selected quantizable layer. With a ``forward_loop``, runs
    the pipeline once (one statistics pass, ``config.calibrator``, the config's
    refiners); afterwards :func:`calibrate` can choose ranges with any other
    calibrator from the same statistics, without another pass.

    Args:
        model: Any ``nn.Module``; its device is kept.
        config: What and how to quantize (default :func:`int8_config`).
        forward_loop: ``forward_loop(model)`` runs calibration batches through it.

    Returns:
        The same ``model``, quantized (or with quantizers off if no forward_loop).
    """
    config = config or get_config(model) or int8_config()
    if forward_loop is None:
        prepare(model, config)
    else:
        run(model, forward_loop, {config.calibrator: dict(config.calibrator_params)}, config=config)
    return model


def collected_statistics(model: nn.Module) -> Dict[str, HistogramStats]:
    """Activation statistics gathered by the last statistics pass, by module name."""
    return statistics_of(model).saved()


def calibrate(model: nn.Module, calibrator: str = "entropy", **params: Any) -> Scales:
    """Chooses every activation range with ``calibrator`` from the collected statistics.

    Weights get per-channel (or per-tensor) max ranges from the weights themselves.
    The model is left fake-quantizing with the new ranges. Refiners (AdaRound,
    bias correction) are not re-run: they need the calibration data.

    Raises:
        UnknownCalibratorError: for an unregistered name.
        CalibrationError: if no statistics were collected (empty calibration data).
    """
    inputs = [r for r in iter_quantizers(model) if r.role is Role.INPUT]
    if not inputs:
        raise CalibrationError("the model has no quantizers: call quantlab.quantize(model, ...) first")
    if all(r.quantizer.collector is None for r in inputs):
        raise CalibrationError("no statistics collected yet: pass forward_loop to quantlab.quantize (or run quantlab.pipeline.collect)")
    statistics = statistics_of(model)
    if statistics.num_batches == 0:
        raise CalibrationError("calibration data is empty: no batch reached any quantized layer")
    ranges = choose(statistics, calibrator, params)
    apply(model, ranges)
    return scales_of(model, calibrator=ranges.calibrator, calibrator_params=ranges.params, statistics=statistics.saved())


def current_scales(
    model: nn.Module,
    *,
    calibrator: str = "",
    calibrator_params: Optional[Dict[str, Any]] = None,
    statistics: Optional[Dict[str, HistogramStats]] = None,
) -> Scales:
    """A :class:`Scales` snapshot of the ranges the model holds now."""
    return scales_of(model, calibrator=calibrator, calibrator_params=calibrator_params, statistics=statistics)


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
    return apply_scales(model, scales, strict=strict)


def set_quantizer_amax(model: nn.Module, module_name: str, role: "Role | str", amax: Any) -> None:
    """Sets one quantizer's range by module name and role."""
    role = Role(role)
    for ref in iter_quantizers(model):
        if ref.module_name == module_name and ref.role is role:
            ref.quantizer.set_amax(amax)
            return
    raise KeyError(f"no {role.value} quantizer on module '{module_name}'")


__all__ = ["quantize", "calibrate", "load_scales", "current_scales", "collected_statistics", "get_config", "set_quantizer_amax"]
