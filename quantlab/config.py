"""Quantization configuration: frozen dataclasses with a version and dict round trip.

Presets are functions (``int8_config()``), never mutable module-level dicts, so a
caller can never change another caller's defaults.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

from quantlab.errors import ConfigError

CONFIG_VERSION = 2  # 2: algorithms, algorithm_params (version 1 files still load)


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor is quantized (symmetric, signed integers).

    Attributes:
        num_bits: Integer width; 8 for INT8.
        narrow_range: Use ``[-(2^(b-1)-1), 2^(b-1)-1]`` (``[-127, 127]``) instead of
            ``[-2^(b-1), 2^(b-1)-1]``. Weights traditionally use the narrow range so
            that the grid is symmetric.
        per_channel: One amax per output channel (weights) instead of one per tensor.
        axis: The channel axis, resolved when the quantizer is attached to a
            module (0 for Conv/Linear weights, 1 for ConvTranspose and HF Conv1D).
            ``None`` means per-tensor.
    """

    num_bits: int = 8
    narrow_range: bool = False
    per_channel: bool = False
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        if not 2 <= self.num_bits <= 8:
            raise ConfigError(f"num_bits must be in [2, 8] for integer fake quantization, got {self.num_bits}")
        if self.axis is not None and not self.per_channel:
            raise ConfigError("axis is set but per_channel is False")

    @property
    def bound(self) -> int:
        """Largest representable magnitude on the grid: ``2^(b-1) - 1`` (127 for INT8)."""
        return (1 << (self.num_bits - 1)) - 1

    @property
    def quant_min(self) -> int:
        return -self.bound if self.narrow_range else -self.bound - 1

    @property
    def quant_max(self) -> int:
        return self.bound

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantizerSpec":
        return _from_dict(cls, data, "quantizer spec")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        input: Spec for the input (activation) quantizer of every quantized layer.
        weight: Spec for the weight quantizer.
        include: fnmatch patterns of module names to quantize ("*" = all).
        exclude: fnmatch patterns of module names to leave in floating point.
        calibrator: Calibrator applied by ``quantize`` after the statistics pass.
        calibrator_params: Extra parameters of that calibrator (e.g. percentile).
        num_bins: Initial histogram bins per activation tensor.
        algorithms: Names of PTQ algorithms (:mod:`quantlab.algorithms`) the
            pipeline runs: transforms before the statistics pass, refiners after
            the ranges are applied (e.g. ``("cle", "bias-correction")``).
        algorithm_params: Per-algorithm parameters, ``((name, ((key, value), ...)), ...)``.
        version: Schema version of this config, for forward-compatible loading.
    """

    input: QuantizerSpec = QuantizerSpec(num_bits=8, narrow_range=False, per_channel=False)
    weight: QuantizerSpec = QuantizerSpec(num_bits=8, narrow_range=True, per_channel=True)
    include: Tuple[str, ...] = ("*",)
    exclude: Tuple[str, ...] = ()
    calibrator: str = "entropy"
    calibrator_params: Tuple[Tuple[str, Any], ...] = ()
    num_bins: int = 2048
    algorithms: Tuple[str, ...] = ()
    algorithm_params: Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...] = ()
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.input.per_channel:
            raise ConfigError("activations are quantized per tensor (TensorRT rejects per-channel activations)")
        if self.num_bins < 128:
            raise ConfigError(f"num_bins must be >= 128, got {self.num_bins}")
        # Accept lists/dicts from callers and store hashable tuples (frozen dataclass).
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        params = self.calibrator_params
        if isinstance(params, dict):
            params = tuple(sorted(params.items()))
        object.__setattr__(self, "calibrator_params", tuple(tuple(p) for p in params))
        if isinstance(self.algorithms, str):
            object.__setattr__(self, "algorithms", tuple(n.strip() for n in self.algorithms.split(",") if n.strip()))
        object.__setattr__(self, "algorithms", tuple(str(n).lower() for n in self.algorithms))
        nested = self.algorithm_params
        if isinstance(nested, dict):
            nested = tuple(sorted(nested.items()))
        object.__setattr__(self, "algorithm_params", tuple(
            (str(name), tuple(sorted(p.items())) if isinstance(p, dict) else tuple(tuple(kv) for kv in p))
            for name, p in nested))

    def params_of(self, algorithm: str) -> Dict[str, Any]:
        """The parameters given for one algorithm (empty if none)."""
        return dict(dict(self.algorithm_params).get(algorithm, ()))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "version": self.version,
            "input": self.input.to_dict(),
            "weight": self.weight.to_dict(),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "calibrator": self.calibrator,
            "calibrator_params": dict(self.calibrator_params),
            "num_bins": self.num_bins,
            "algorithms": list(self.algorithms),
            "algorithm_params": {name: dict(p) for name, p in self.algorithm_params},
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantConfig":
        data = dict(data)
        version = data.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(f"config version {version} is newer than this quantlab understands ({CONFIG_VERSION})")
        for key in ("input", "weight"):
            if key in data and isinstance(data[key], dict):
                data[key] = QuantizerSpec.from_dict(data[key])
        return _from_dict(cls, data, "quantization config")

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, data: Dict[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {what} field(s): {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"invalid {what}: {exc}") from None


def int8_config(
    calibrator: str = "entropy",
    *,
    include: Tuple[str, ...] = ("*",),
    exclude: Tuple[str, ...] = (),
    per_channel_weights: bool = True,
    algorithms: Tuple[str, ...] = (),
    algorithm_params: Optional[Dict[str, Dict[str, Any]]] = None,
    **calibrator_params: Any,
) -> QuantConfig:
    """TensorRT-style INT8: per-channel narrow-range weights, per-tensor activations.

    Args:
        calibrator: Name of the calibrator ``quantize`` applies after collecting statistics.
        include: Module-name patterns to quantize.
        exclude: Module-name patterns to keep in floating point.
        per_channel_weights: Per-output-channel weight scales (recommended; essential
            for depthwise convolutions).
        algorithms: PTQ algorithms of the pipeline (:mod:`quantlab.algorithms`), e.g.
            ``("bn-fold", "adaround", "bias-correction")``.
        algorithm_params: Per-algorithm parameters, e.g. ``{"adaround": {"iterations": 500}}``.
        **calibrator_params: Passed to the calibrator (e.g. ``percentile=99.9``).
    """
    return QuantConfig(
        weight=QuantizerSpec(num_bits=8, narrow_range=True, per_channel=per_channel_weights),
        include=tuple(include),
        exclude=tuple(exclude),
        calibrator=calibrator,
        calibrator_params=tuple(sorted(calibrator_params.items())),
        algorithms=tuple(algorithms),
        algorithm_params=dict(algorithm_params or {}),  # normalized to nested tuples by QuantConfig
    )
