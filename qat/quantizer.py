"""The quantizer used during QAT: fixed, recomputed or learned ranges.

:class:`QATQuantizer` is a :class:`quantlab.TensorQuantizer`, so everything in the
core (``iter_quantizers``, ``current_scales``, ``set_mode``, scales files, export)
keeps working. It keeps the state_dict key ``amax``; a learned amax is an
``nn.Parameter`` under that same name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quantlab.functional import amax_of_weight, fake_quantize
from quantlab.qat.learnable import lsq_fake_quantize
from quantlab.tensor_quantizer import QuantizerMode, TensorQuantizer

#: How weight ranges evolve during QAT.
WEIGHT_RANGES = ("recompute", "learn", "fixed")


class QATQuantizer(TensorQuantizer):
    """A TensorQuantizer whose range is fixed, recomputed from the tensor, or learned (LSQ).

    Args:
        source: The quantizer to replace (spec, name, amax, mode and statistics are copied).
        learn: Make ``amax`` a learnable Parameter (LSQ gradient).
        recompute: Set ``amax`` to ``max|x|`` (per channel) at every quantizing
            forward; meant for weights, whose range then follows the training.
    """

    def __init__(self, source: TensorQuantizer, *, learn: bool = False, recompute: bool = False) -> None:
        channels = int(source.amax.numel()) if source.spec.axis is not None else None
        super().__init__(source.spec, role=source.role, name=source.name, channels=channels, num_bins=source.num_bins)
        if learn and recompute:
            raise ValueError("a range is either learned or recomputed, not both")
        amax = source.amax.detach().clone()
        if learn:
            del self._buffers["amax"]
            self.amax = nn.Parameter(amax.to(torch.float32))
        else:
            self.amax = amax.to(torch.float32)  # replaces the NaN buffer
        self.learn_amax = learn
        self.recompute_amax = recompute
        self.restore(source.mode)
        self.collector = source.collector
        # The mode prepare() chose; quantlab.qat.enabled(model, True) returns to it.
        self.active_mode: QuantizerMode = source.mode

    def set_amax(self, amax) -> None:
        value = torch.as_tensor(amax, dtype=torch.float32, device=self.amax.device)
        if value.shape != self.amax.shape:
            raise ValueError(f"amax for '{self.name}' ({self.role}) has shape {tuple(value.shape)}, expected {tuple(self.amax.shape)}")
        with torch.no_grad():
            self.amax.copy_(value)

    def refresh_amax(self, x: torch.Tensor) -> torch.Tensor:
        """Sets (and returns) the range from ``x`` for a recomputed quantizer."""
        with torch.no_grad():
            amax = amax_of_weight(x, self.spec)
            self.amax.copy_(amax)
        return amax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is not QuantizerMode.QUANTIZE:
            return super().forward(x)
        if self.recompute_amax:
            return fake_quantize(x, self.refresh_amax(x), self.spec)
        if self.learn_amax and torch.is_grad_enabled() and self.amax.requires_grad:
            return lsq_fake_quantize(x, self.amax, self.spec)
        return fake_quantize(x, self.amax, self.spec, scale=self.fixed_scale())

    def extra_repr(self) -> str:
        how = "learned" if self.learn_amax else "recomputed" if self.recompute_amax else "fixed"
        return f"{super().extra_repr()}, range={how}"


def is_learnable(quantizer: Optional[TensorQuantizer]) -> bool:
    return isinstance(quantizer, QATQuantizer) and quantizer.learn_amax
