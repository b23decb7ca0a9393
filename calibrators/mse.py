"""The ``mse`` calibrator: the amax with the least expected fake-quantization error."""
from __future__ import annotations

from typing import Tuple

import torch

from .base import HistogramStats, register_calibrator

# Elements of one [candidates, bins] float64 matrix per chunk; a chunk keeps a
# few of them alive, so the budget bounds peak memory for any histogram size.
# Accelerators: 1 Mi elements (~32 MB peak), few kernel launches. CPUs: 64 Ki
# elements keep the chunk in cache; for a 2048-bin histogram that measured
# 4-6x faster than 1 Mi on one and two threads (11 vs 58 ms, 13 vs 79 ms).
_CHUNK_ELEMENTS = 1 << 20
_CPU_CHUNK_ELEMENTS = 1 << 16


def _validate(num_bits: int, start_bin: int, stride: int) -> None:
    if int(num_bits) != num_bits or num_bits < 2:
        raise ValueError(f"num_bits must be an integer >= 2, got {num_bits!r}")
    if int(start_bin) != start_bin or start_bin < 1:
        raise ValueError(f"start_bin must be an integer >= 1, got {start_bin!r}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")


def mse_errors(
    stats: HistogramStats, *, num_bits: int = 8, start_bin: int = 128, stride: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Count-weighted squared fake-quantization error of every candidate amax.

    Each bin is represented by its centre ``c``; for a candidate ``amax`` the
    error is ``sum(counts * (c - fq(c, amax)) ** 2)`` where ``fq`` is symmetric
    fake quantization with ``scale = amax / (2 ** (num_bits - 1) - 1)``, round
    half to even and clamping to ``2 ** (num_bits - 1) - 1`` (centres are
    ``>= 0``, so the lower clamp never applies).

    Args:
        stats: Collected ``|x|`` histogram.
        num_bits: Bit width of the signed quantized values.
        start_bin: Index of the smallest candidate bin.
        stride: Step between candidate bin indices.

    Returns:
        ``(candidates, errors)``: float64 candidate amaxes ``centres[i]`` for
        ``i`` in ``range(start_bin, num_bins, stride)`` (bin centres, as
        pytorch-quantization's and Model Optimizer's ``_compute_amax_mse``
        take them) and their float64 errors, both on the counts' device (empty
        when ``num_bins <= start_bin``).
    """
    _validate(num_bits, start_bin, stride)
    device = stats.counts.device
    counts = stats.counts.detach().reshape(-1).to(torch.float64)
    edges = stats.edges(torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    candidates = centres[start_bin::stride]
    errors = torch.empty(candidates.numel(), dtype=torch.float64, device=device)
    n = candidates.numel()
    if n == 0:
        return candidates, errors

    qmax = float((1 << (num_bits - 1)) - 1)
    # Only bins with counts contribute; dropping the rest shrinks every matrix
    # (sparse histograms are common) without changing any sum's terms.
    used = torch.nonzero(counts, as_tuple=True)[0]
    c = centres[used][None, :]
    w = counts[used][None, :]
    budget = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS
    rows = max(1, budget // max(1, used.numel()))
    for lo in range(0, n, rows):
        amax = candidates[lo : lo + rows, None]
        scale = amax / qmax
        # torch.round rounds half to even, like TensorRT / ONNX QuantizeLinear.
        fq = torch.clamp(torch.round(c / scale), max=qmax) * scale
        errors[lo : lo + rows] = ((c - fq) ** 2 * w).sum(dim=1)
    return candidates, errors


@register_calibrator("mse")
def mse_calibrator(
    stats: HistogramStats, *, num_bits: int = 8, start_bin: int = 128, stride: int = 1
) -> float:
    """Returns the candidate amax minimizing the expected squared quantization error.

    Candidates are bin centres ``centres[i]`` (``i`` from ``start_bin`` up to
    ``num_bins - 1``, step ``stride``), the grid of the reference
    implementations (pytorch-quantization, Model Optimizer), so the same
    histogram gives the same amax; the first of equal minima (the smallest
    amax, i.e. the finest scale) wins. The error curve is flat near its
    minimum: on the demo CNN a grid of bin edges instead picked amaxes up to
    23 bins away at errors within 3.3e-4 (relative) of these.

    Args:
        stats: Collected ``|x|`` histogram (CPU or CUDA counts).
        num_bits: Bit width of the signed quantized values.
        start_bin: Index of the smallest candidate bin.
        stride: Step between candidate bin indices.

    Returns:
        The amax as a Python float: ``0.0`` when the histogram is empty or
        ``stats.amax`` is 0; ``stats.amax`` when there are no more than
        ``start_bin`` bins (no candidate exists, so nothing is clipped).

    Raises:
        ValueError: For ``num_bits < 2``, ``start_bin < 1`` or ``stride < 1``.
    """
    _validate(num_bits, start_bin, stride)
    amax = float(stats.amax)
    if amax <= 0.0 or stats.num_bins == 0 or not bool((stats.counts != 0).any()):
        return 0.0
    if stats.num_bins <= start_bin:
        return amax
    candidates, errors = mse_errors(stats, num_bits=num_bits, start_bin=start_bin, stride=stride)
    return float(candidates[int(torch.argmin(errors))])
