"""TensorQuantizer: the module that owns one tensor's range (amax) and its mode.

Every change of mode goes through the quantizer's own methods (:meth:`collect`,
:meth:`quantize_with`, :meth:`set_mode`, :meth:`off`, :meth:`restore`), so the rules
(no quantizing without a range, fresh statistics for each pass) hold everywhere.
"""
from __future__ import annotations

import enum
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from quantlab.config import QuantizerSpec
from quantlab.errors import CalibrationError
from quantlab.roles import Role
from quantlab.functional import _tracing, fake_quantize, scale_from_amax
from quantlab.statistics import HistogramCollector


# Plain attributes (mode, collector) are set past nn.Module.__setattr__, which first checks whether
# the value is a parameter, buffer or module: a few microseconds per call, and a run changes the
# mode of every quantizer of the model several times.
_set = object.__setattr__


class QuantizerMode(str, enum.Enum):
    """What a quantizer does with the tensor passing through it."""

    OFF = "off"  #: pass through unchanged (floating point)
    COLLECT = "collect"  #: pass through unchanged, gather statistics
    QUANTIZE = "quantize"  #: fake-quantize with the stored amax


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor; its amax lives in a buffer (saved in state_dict).

    Statistics are gathered by a separate :class:`HistogramCollector` and the amax
    is chosen later by a calibrator, so collecting and choosing never mix.

    Args:
        spec: Bits, range and (resolved) channel axis.
        role: :class:`Role` (or its string value).
        name: Name of the module this quantizer belongs to (for messages and scales).
        channels: Number of channels for a per-channel quantizer.
        num_bins: Histogram resolution for activation statistics.
    """

    def __init__(
        self,
        spec: QuantizerSpec,
        *,
        role: "Role | str",
        name: str = "",
        channels: Optional[int] = None,
        num_bins: int = 2048,
    ) -> None:
        super().__init__()
        if spec.per_channel and spec.axis is None:
            raise ValueError("a per-channel quantizer needs a resolved axis")
        self.spec = spec
        self.role = Role(role)
        self.name = name
        shape: Sequence[int] = (int(channels),) if spec.axis is not None else ()
        self.register_buffer("amax", torch.full(tuple(shape), float("nan")))
        self._mode = QuantizerMode.OFF
        self.collector: Optional[HistogramCollector] = None
        self.num_bins = num_bins

    # -- state ---------------------------------------------------------------------------
    @property
    def mode(self) -> QuantizerMode:
        """What the quantizer does now; changed only through the transition methods."""
        return self._mode

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.amax).all())

    def set_amax(self, amax) -> None:
        """Stores a new range (scalar or per-channel), keeping the buffer's device."""
        if isinstance(amax, (int, float)) and self.amax.dim() == 0:
            with torch.no_grad():
                self.amax.fill_(float(amax))  # a kernel argument: no host-to-device copy, no sync
            return
        if (isinstance(amax, torch.Tensor) and amax.shape == self.amax.shape and amax.dtype == torch.float32
                and amax.device == self.amax.device):
            with torch.no_grad():  # the common case (measured weight ranges): one copy, no conversion
                self.amax.copy_(amax)
            return
        value = torch.as_tensor(amax, dtype=torch.float32, device=self.amax.device)
        if value.shape != self.amax.shape:
            raise ValueError(
                f"amax for '{self.name}' ({self.role}) has shape {tuple(value.shape)}, "
                f"expected {tuple(self.amax.shape)}"
            )
        with torch.no_grad():
            self.amax.copy_(value)

    def set_mode(self, mode: "QuantizerMode | str") -> None:
        """Switches mode; quantizing needs an amax, collecting starts fresh statistics."""
        mode = QuantizerMode(mode)
        if mode is QuantizerMode.QUANTIZE and not self.is_calibrated:
            raise CalibrationError(f"quantizer '{self.name}' ({self.role.value}) has no amax yet: calibrate or load scales first")
        if mode is QuantizerMode.COLLECT:
            self.collect()
            return
        _set(self, "_mode", mode)

    def collect(self) -> None:
        """Starts a statistics pass: an input quantizer gathers fresh statistics; a weight
        quantizer stays off (weights are measured directly, not collected)."""
        if self.role is not Role.INPUT:
            _set(self, "_mode", QuantizerMode.OFF)
            return
        previous = self.collector
        _set(self, "collector", HistogramCollector(self.num_bins, name=self.name))
        if previous is not None:
            self.collector.reuse_device_state(previous)
        _set(self, "_mode", QuantizerMode.COLLECT)

    def quantize_with(self, amax=None, *, verified: bool = False) -> None:
        """Starts fake-quantizing, with a new range or the one stored.

        Args:
            amax: A Python float or list (checked on the host), a tensor of the
                quantizer's shape, or None to keep the stored range.
            verified: The caller has already checked that the (tensor) range is
                finite, e.g. with one read-back for many quantizers; otherwise a
                tensor range is checked here, which waits for the device.

        Raises:
            CalibrationError: the range is NaN or infinite.
        """
        if isinstance(amax, (int, float, list, tuple)):
            values = amax if isinstance(amax, (list, tuple)) else [amax]
            if not all(math.isfinite(float(v)) for v in values):
                raise CalibrationError(f"quantizer '{self.name}' ({self.role.value}): amax {amax} is not finite")
            verified = True
        if amax is not None:
            self.set_amax(amax)
        if verified:
            _set(self, "_mode", QuantizerMode.QUANTIZE)
        else:
            self.set_mode(QuantizerMode.QUANTIZE)

    def off(self) -> None:
        """Passes tensors through unchanged (floating point) until switched again."""
        _set(self, "_mode", QuantizerMode.OFF)

    def restore(self, mode: "QuantizerMode | str") -> None:
        """Returns to a mode this quantizer held before (saved by the caller), without checks:
        the range and statistics it needed are still here. Statistics are not restarted."""
        _set(self, "_mode", QuantizerMode(mode))

    def fixed_scale(self) -> Optional[torch.Tensor]:
        """The scale for the current amax, cached until amax changes (None if amax is learned).

        A fixed range's scale is the same every step; recomputing it was two
        kernel launches per quantizer per forward. The cache holds the amax
        tensor itself, so an amax that is replaced (``.to()``, a new buffer) or
        modified in place (its version counter) is never confused with the old.
        """
        amax = self.amax
        if amax.requires_grad or _tracing():
            return None
        cached = self.__dict__.get("_scale_cache")
        if cached is not None and cached[0] is amax and cached[1] == amax._version:
            return cached[2]
        scale = scale_from_amax(amax, self.spec)
        self.__dict__["_scale_cache"] = (amax, amax._version, scale)
        return scale

    # -- forward ---------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Adds ``x`` to the statistics being collected (if any); ``x`` itself is left as it is."""
        if self.collector is not None:
            self.collector.update(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantizes ``x`` in QUANTIZE mode; otherwise returns ``x`` itself, observing it in COLLECT mode.

        A subclass may change what QUANTIZE does, never the other two modes: ``x`` is then
        returned unchanged, and the input hook and :func:`quantlab.pass_calls.pass_calls`
        skip the call entirely there (it costs host time per layer per batch).
        """
        mode = self._mode  # the attribute, not the property: this runs per layer per batch
        if mode is QuantizerMode.QUANTIZE:
            return fake_quantize(x, self.amax, self.spec, scale=self.fixed_scale())
        if mode is QuantizerMode.COLLECT:
            self.observe(x)
        return x

    def extra_repr(self) -> str:
        axis = "per-tensor" if self.spec.axis is None else f"axis={self.spec.axis}"
        return f"{self.role.value}, {self.spec.num_bits}-bit, {axis}, narrow={self.spec.narrow_range}, mode={self.mode.value}"


def quantize_all_with(quantizers: Sequence[TensorQuantizer], amaxes: Sequence[float]) -> List[float]:
    """:meth:`TensorQuantizer.quantize_with` for many quantizers with Python float ranges.

    Where several per-tensor quantizers share a device, their ranges go there in one
    host-to-device copy and one multi-tensor copy instead of a fill each (each operation
    costs 10-50 us of a GPU host's time, and a model has dozens of input quantizers). The
    stored values are the same: float32 roundings of the given floats.

    Returns:
        The ranges as the float32 buffers now hold them (rounded on the host: no read-back).

    Raises:
        CalibrationError: a range is NaN or infinite (checked before any is stored).
    """
    for q, amax in zip(quantizers, amaxes):
        if not math.isfinite(float(amax)):
            raise CalibrationError(f"quantizer '{q.name}' ({q.role.value}): amax {amax} is not finite")
    rounded = torch.tensor([float(amax) for amax in amaxes], dtype=torch.float32)
    by_device: Dict[torch.device, List[int]] = {}
    for i, q in enumerate(quantizers):
        if q.amax.dim() == 0 and q.amax.dtype == torch.float32:
            by_device.setdefault(q.amax.device, []).append(i)
        else:
            q.set_amax(float(amaxes[i]))
    with torch.no_grad():
        for device, indices in by_device.items():
            if len(indices) == 1:
                quantizers[indices[0]].set_amax(float(amaxes[indices[0]]))
                continue
            values = rounded[indices]
            if device.type != "cpu":  # from pageable memory the bytes are staged at once: no wait for the device
                values = values.to(device, non_blocking=True)
            torch._foreach_copy_([quantizers[i].amax for i in indices], list(values.unbind(0)))
    for q in quantizers:
        q.quantize_with(verified=True)
    return rounded.tolist()


def store_ranges(quantizers: Sequence[TensorQuantizer], amaxes: Sequence[torch.Tensor]) -> None:
    """:meth:`TensorQuantizer.set_amax` for many quantizers with tensor ranges (e.g. measured weights).

    Ranges of the quantizer's shape, dtype and device go in with one multi-tensor copy per
    device instead of a copy each; the others through :meth:`~TensorQuantizer.set_amax`.
    """
    by_device = {}
    for q, amax in zip(quantizers, amaxes):
        if (isinstance(amax, torch.Tensor) and amax.shape == q.amax.shape and amax.dtype == torch.float32
                and amax.device == q.amax.device and q.amax.dtype == torch.float32):
            by_device.setdefault(q.amax.device, []).append((q.amax, amax))
        else:
            q.set_amax(amax)
    with torch.no_grad():
        for pairs in by_device.values():
            torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs])
