"""SmoothQuant's statistics, per-group alpha search and the exact fold.

``s_j = max|X_j|^alpha / max|W[:, j]|^(1 - alpha)`` per producer channel ``j``;
the producer's output channel ``j`` is divided by ``s_j`` and every consumer
input column carrying channel ``j`` is multiplied by it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from quantlab.config import QuantizerSpec
from quantlab.functional import amax_of_weight, fake_quantize

#: Factors are kept in this range: a channel that is always zero (in X or in W) keeps s = 1.
MIN_FACTOR, MAX_FACTOR = 1e-5, 1e5


class InputStatistics:
    """Per-channel abs-max and a small row sample of one Linear's input over the calibration data.

    Args:
        rows: Rows (tokens) kept for the search; every batch contributes a
            random share plus its two largest rows (outlier tokens are rare and
            decide the per-tensor range).
        seed: Seed of the row sampling.
    """

    def __init__(self, rows: int, seed: int = 0) -> None:
        self.rows = rows
        self.amax: Optional[torch.Tensor] = None
        self._kept: List[torch.Tensor] = []
        self._scores: List[torch.Tensor] = []
        self._count = 0
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        row_max = flat.abs().amax(dim=1)
        channel_max = flat.abs().amax(dim=0)
        self.amax = channel_max if self.amax is None else torch.maximum(self.amax, channel_max)
        take = min(flat.shape[0], max(4, self.rows // 4))
        picked = torch.randperm(flat.shape[0], generator=self._generator)[:take].to(flat.device)
        top = torch.topk(row_max, min(2, flat.shape[0])).indices
        index = torch.unique(torch.cat([picked, top]))
        self._kept.append(flat[index].clone())
        self._scores.append(row_max[index])
        self._count += len(index)
        if self._count > 2 * self.rows:
            self._shrink()

    def _shrink(self) -> None:
        kept, scores = torch.cat(self._kept), torch.cat(self._scores)
        if kept.shape[0] > self.rows:
            top = torch.topk(scores, min(8, self.rows // 8 or 1)).indices
            rest = torch.randperm(kept.shape[0], generator=self._generator)[: self.rows].to(kept.device)
            index = torch.unique(torch.cat([top, rest]))[: self.rows + len(top)]
            kept, scores = kept[index], scores[index]
        self._kept, self._scores, self._count = [kept], [scores], kept.shape[0]

    def sample(self) -> torch.Tensor:
        """The kept rows ``[n, C]`` (float32)."""
        self._shrink()
        return self._kept[0]


@dataclasses.dataclass
class Consumer:
    """One consumer Linear of a fold group.

    Attributes:
        name: Module name.
        module: The Linear.
        mapping: ``mapping[c]`` = the producer channel its input column ``c`` carries.
        sample: Calibration rows of its input ``[n, C_in]``.
        amax: Per-column abs-max of its input over the whole calibration data.
        quantized: Whether the config quantizes it (only those count in the loss).
        cached_reference: ``X W^T`` on the sample and its mean square (filled by the search).
    """

    name: str
    module: nn.Linear
    mapping: torch.Tensor
    sample: torch.Tensor
    amax: torch.Tensor
    quantized: bool
    cached_reference: Optional[Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default=None, repr=False)


def channel_maxima(consumers: Sequence[Consumer], channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per producer channel: max |X| and max |W column| over every consumer column carrying it."""
    device = consumers[0].module.weight.device
    x_max = torch.zeros(channels, device=device)
    w_max = torch.zeros(channels, device=device)
    for c in consumers:
        mapping = c.mapping.to(device)
        x_max.scatter_reduce_(0, mapping, c.amax.to(device).float(), "amax")
        w_max.scatter_reduce_(0, mapping, c.module.weight.detach().abs().amax(dim=0).float(), "amax")
    return x_max, w_max


def smoothing_factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_max^alpha / w_max^(1 - alpha)``, 1 where either maximum is zero, clamped."""
    live = (x_max > 0) & (w_max > 0)
    s = x_max.clamp_min(1e-12).pow(alpha) / w_max.clamp_min(1e-12).pow(1.0 - alpha)
    s = torch.where(live, s, torch.ones_like(s))
    return s.clamp(MIN_FACTOR, MAX_FACTOR)


def quantized_output_error(consumers: Sequence[Consumer], s: torch.Tensor, weight_spec: QuantizerSpec,
                           input_spec: QuantizerSpec) -> float:
    """Sum over quantized consumers of ||Q(X/s) Q(W s)^T - X W^T||^2 / ||X W^T||^2 on their samples.

    The per-tensor input range is the static max over the whole calibration data
    after smoothing (exact from the per-channel maxima); weights per output channel
    (or per tensor) as the config says.
    """
    total = 0.0
    for c in consumers:
        if not c.quantized:
            continue
        weight = c.module.weight.detach().float()
        x = c.sample.to(weight.device)
        sc = s[c.mapping.to(weight.device)]
        x_range = (c.amax.to(weight.device).float() / sc).amax()
        xq = fake_quantize(x / sc, x_range, input_spec)
        ws = weight * sc
        wq = fake_quantize(ws, amax_of_weight(ws, weight_spec), weight_spec)
        reference, energy = _reference(c, x, weight)
        total += float(torch.sub(xq @ wq.t(), reference).pow_(2).mean() / energy)
    return total


def _reference(c: Consumer, x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``X W^T`` and its mean square, computed once per consumer (the weight is not changed during a search)."""
    if c.cached_reference is None:
        reference = x @ weight.t()
        c.cached_reference = (reference, (reference**2).mean().clamp_min(1e-30))
    return c.cached_reference


def search_alpha(consumers: Sequence[Consumer], channels: int, grid: Sequence[float], weight_spec: QuantizerSpec,
                 input_spec: QuantizerSpec) -> Tuple[Optional[float], torch.Tensor, Dict[str, float]]:
    """The alpha of ``grid`` with the lowest quantized output error, or None if no smoothing is best.

    Returns:
        ``(alpha, s, losses)``: losses by alpha (``"none"`` = no smoothing).
    """
    x_max, w_max = channel_maxima(consumers, channels)
    losses = {"none": quantized_output_error(consumers, torch.ones_like(x_max), weight_spec, input_spec)}
    best: Tuple[Optional[float], torch.Tensor, float] = (None, torch.ones_like(x_max), losses["none"])
    for alpha in grid:
        s = smoothing_factors(x_max, w_max, float(alpha))
        loss = quantized_output_error(consumers, s, weight_spec, input_spec)
        losses[f"{float(alpha):g}"] = loss
        if loss < best[2]:
            best = (float(alpha), s, loss)
    return best[0], best[1], losses


@torch.no_grad()
def fold(producer: nn.Module, kind: str, consumers: Sequence[Consumer], s: torch.Tensor) -> None:
    """Divides the producer's output channels by ``s`` and multiplies the consumers' columns by it."""
    s = s.to(producer.weight.device)
    if kind == "norm":
        producer.weight.div_(s.to(producer.weight.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype)[:, None])
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for c in consumers:
        weight = c.module.weight
        weight.mul_(s.to(weight.device, weight.dtype)[c.mapping.to(weight.device)][None, :])
