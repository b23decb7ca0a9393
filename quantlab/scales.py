"""The scales artifact: every quantizer's amax plus the statistics it came from.

A versioned JSON file, written atomically. The statistics (histograms) are stored
too, so a calibrator can be re-run or compared later without data or model.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from quantlab._io import write_text_atomic
from quantlab.calibrators import HistogramStats, choose_ranges, get_calibrator
from quantlab.config import QuantConfig
from quantlab.errors import ScalesFormatError
from quantlab.roles import Role
from quantlab.validation import check_scales, read_json_file

FORMAT_NAME = "quantlab.scales"
FORMAT_VERSION = 1
#: Largest scales file read (histograms of every activation: ~10 KB each; 1 GB is ~100k layers).
MAX_SCALES_BYTES = 1 << 30

Amax = Union[float, List[float]]


@dataclasses.dataclass(frozen=True)
class QuantizerScale:
    """The range of one quantizer.

    Attributes:
        module: Name of the quantized module (``model.named_modules()`` name).
        role: :class:`~quantlab.roles.Role` (a string in the file).
        amax: A float (per-tensor) or one float per channel.
        num_bits: Integer width.
        narrow_range: Whether the grid is ``[-127, 127]`` (else ``[-128, 127]``).
        axis: Channel axis for per-channel ranges, else None.
    """

    module: str
    role: Role
    amax: Amax
    num_bits: int = 8
    narrow_range: bool = False
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))

    @property
    def key(self) -> str:
        return f"{self.module}:{self.role.value}"

    @property
    def scale(self) -> Amax:
        """``amax / (2^(b-1) - 1)``: what a Q/DQ node or a calibration cache stores."""
        bound = (1 << (self.num_bits - 1)) - 1
        if isinstance(self.amax, list):
            return [a / bound for a in self.amax]
        return self.amax / bound


def _stats_to_dict(stats: HistogramStats) -> Dict[str, Any]:
    counts = stats.counts.detach().to("cpu", torch.int64)
    nonzero = int(torch.nonzero(counts).max()) + 1 if bool(counts.any()) else 0
    return {
        "bin_width": stats.bin_width,
        "amax": stats.amax,
        "num_bins": int(counts.numel()),
        "counts": counts[:nonzero].tolist(),  # trailing empty bins are implied by num_bins
    }


def _stats_from_dict(data: Dict[str, Any], where: str) -> HistogramStats:
    try:
        counts = torch.zeros(int(data["num_bins"]), dtype=torch.int64)
        stored = torch.tensor(data["counts"], dtype=torch.int64)
        counts[: stored.numel()] = stored
        stats = HistogramStats(counts=counts, bin_width=float(data["bin_width"]), amax=float(data["amax"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ScalesFormatError(f"{where}: invalid statistics entry ({exc})") from None
    if not stats.bin_width > 0:
        raise ScalesFormatError(f"{where}: statistics bin_width must be > 0")
    return stats


@dataclasses.dataclass
class Scales:
    """Every quantizer's range for one model, and how it was chosen.

    Attributes:
        entries: One :class:`QuantizerScale` per quantizer.
        calibrator: Name of the calibrator that chose the activation ranges.
        calibrator_params: Its parameters.
        statistics: Activation statistics by module name (may be empty).
        config: The quantization config the model was quantized with.
        float_layers: Quantizable layers deliberately kept in floating point
            (mixed precision): both their quantizers stay off when loaded.
        model: A free-form model description (class name, source).
        created: ISO timestamp.
        algorithms: What the PTQ algorithms did before these ranges were chosen:
            ``{"transforms": [report, ...], "refinements": [report, ...]}`` (empty
            without algorithms). Their weights are in the checkpoint beside this file
            (:mod:`quantlab.checkpoint`): these ranges fit those weights, not the FP32 ones.
    """

    entries: List[QuantizerScale]
    calibrator: str = "max"
    calibrator_params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    statistics: Dict[str, HistogramStats] = dataclasses.field(default_factory=dict)
    config: Optional[QuantConfig] = None
    float_layers: List[str] = dataclasses.field(default_factory=list)
    model: str = ""
    created: str = dataclasses.field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    algorithms: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def changed_weights(self) -> bool:
        """Whether algorithms changed the weights these ranges were measured on (a checkpoint holds them)."""
        return bool(self.algorithms.get("transforms") or self.algorithms.get("refinements"))

    # -- lookup ---------------------------------------------------------------------------------
    def as_dict(self) -> Dict[str, QuantizerScale]:
        return {e.key: e for e in self.entries}

    def get(self, module: str, role: "Role | str") -> QuantizerScale:
        role = Role(role).value
        try:
            return self.as_dict()[f"{module}:{role}"]
        except KeyError:
            raise KeyError(f"no {role} scale for module '{module}' in these scales") from None

    # -- re-calibration without data ------------------------------------------------------------
    def without_layers(self, layers: List[str]) -> "Scales":
        """These scales with ``layers`` moved to floating point (mixed precision)."""
        gone = set(layers)
        return dataclasses.replace(
            self,
            entries=[e for e in self.entries if e.module not in gone],
            float_layers=sorted(set(self.float_layers) | gone),
        )

    def recalibrate(self, calibrator: str, **params: Any) -> "Scales":
        """Chooses new activation ranges from the saved statistics (no data needed)."""
        get_calibrator(calibrator)  # an unknown name raises even without statistics
        inputs = [e for e in self.entries if e.role is Role.INPUT and e.module in self.statistics]
        chosen: Dict[str, float] = {}
        for num_bits in sorted({e.num_bits for e in inputs}):
            chosen.update(choose_ranges(calibrator, {e.module: self.statistics[e.module] for e in inputs if e.num_bits == num_bits},
                                        num_bits=num_bits, params=params))
        entries = [dataclasses.replace(e, amax=chosen[e.module]) if e.role is Role.INPUT and e.module in chosen else e
                   for e in self.entries]
        return dataclasses.replace(self, entries=entries, calibrator=calibrator, calibrator_params=dict(params))

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self, *, include_statistics: bool = True) -> Dict[str, Any]:
        data = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created": self.created,
            "model": self.model,
            "calibrator": {"name": self.calibrator, "params": self.calibrator_params},
            "config": self.config.to_dict() if self.config is not None else None,
            "quantizers": [dataclasses.asdict(e) for e in self.entries],
            "float_layers": list(self.float_layers),
            "statistics": {k: _stats_to_dict(v) for k, v in self.statistics.items()} if include_statistics else {},
        }
        if self.algorithms:
            data["algorithms"] = self.algorithms
        return data

    def save(self, path: Union[str, Path], *, include_statistics: bool = True) -> Path:
        """Writes the scales as JSON, atomically (temp file + rename).

        The document is checked with the reader's schema first, so quantlab
        never writes a file it would refuse to read (e.g. an input amax of 0).
        """
        data = self.to_dict(include_statistics=include_statistics)
        check_scales(data, str(path), format_name=FORMAT_NAME, max_version=FORMAT_VERSION, error=ScalesFormatError)
        text = json.dumps(data, indent=1, allow_nan=False)
        return write_text_atomic(path, text)

    @classmethod
    def from_dict(cls, data: Any, where: str = "<scales>") -> "Scales":
        """Builds scales from a parsed scales document, after checking every field.

        Raises:
            ScalesFormatError: naming the field: wrong types (``true`` is not a
                number), amax not finite / negative / too large for float32, an
                input amax of 0, num_bits outside 2..8, a bad statistics entry, ...
        """
        check_scales(data, where, format_name=FORMAT_NAME, max_version=FORMAT_VERSION, error=ScalesFormatError)
        entries = []
        for raw in data.get("quantizers") or []:
            amax = raw["amax"]
            entries.append(QuantizerScale(
                module=raw["module"],
                role=raw["role"],
                amax=[float(a) for a in amax] if isinstance(amax, list) else float(amax),
                num_bits=raw.get("num_bits", 8),
                narrow_range=bool(raw.get("narrow_range", False)),
                axis=raw.get("axis"),
            ))
        calib = data.get("calibrator") or {}
        config = None
        if data.get("config"):
            try:
                config = QuantConfig.from_dict(data["config"])
            except Exception as exc:  # noqa: BLE001 - report any config problem with the file name
                raise ScalesFormatError(f"{where}: invalid config ({exc})") from None
        stats = {k: _stats_from_dict(v, f"{where}: statistics of '{k}'") for k, v in (data.get("statistics") or {}).items()}
        return cls(
            entries=entries,
            calibrator=str(calib.get("name") or "max"),
            calibrator_params=dict(calib.get("params") or {}),
            statistics=stats,
            config=config,
            float_layers=list(data.get("float_layers") or []),
            model=data.get("model") or "",
            created=data.get("created") or "",
            algorithms=dict(data.get("algorithms") or {}),
        )

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Scales":
        """Reads a scales file; a corrupt, truncated or out-of-bounds file raises ScalesFormatError naming it."""
        data = read_json_file(path, what="scales file", error=ScalesFormatError, max_bytes=MAX_SCALES_BYTES)
        return cls.from_dict(data, where=str(path))
