"""The ``mse`` calibrator's scores on a GPU in one kernel launch (used by :mod:`.mse_many`).

The torch-op form scores ``[histograms, candidates, used bins]`` blocks with about seven
passes over float64 blocks of up to 2**25 elements each (ResNet-50's 54 histograms: ~20 ms
on an H200, the largest share of the four calibrators). Here one thread scores one
candidate: it walks its histogram's used bins with the same float64 operations in the same
order (``scale = candidate * (1 / qmax)``: PyTorch divides a CUDA tensor by a scalar that
way; ``fq = min(rint(c / scale), qmax) * scale``, then ``(c - fq) ** 2``), each with its
own IEEE rounding (``__ddiv_rn``/``__dmul_rn``/``__dsub_rn``: the compiler may not fuse
them), so every squared error is the same float as there; only the weighted sum is taken
in another order (``fma`` in bin order), which :mod:`.mse_many`'s tie bound already covers.

Compiled at run time (:mod:`._nvrtc`); where that is missing or fails, :func:`mse_scores` returns None and
the torch-op form runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._nvrtc import compiled, kernel_args, launch

_THREADS = 256

_SOURCE = r"""
extern "C" __global__ void ql_mse_scores(const double* centres, const double* weights, const long long* used,
                                         const long long* row_of, const double* candidates, int width, int n,
                                         double qmax, double inv_qmax, double* errors) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const double candidate = candidates[i];
    if (candidate != candidate) {  // NaN: an absent candidate (past its row's bins in a block), never chosen
        errors[i] = __longlong_as_double(0x7ff0000000000000LL);
        return;
    }
    const long long row = row_of[i];
    const double* c = centres + row * (long long)width;
    const double* w = weights + row * (long long)width;
    // candidate / qmax as PyTorch computes a tensor divided by a scalar on CUDA: times the reciprocal.
    const double scale = __dmul_rn(candidate, inv_qmax);
    const long long count = used[row];
    double total = 0.0;
    for (long long j = 0; j < count; ++j) {
        double q = rint(__ddiv_rn(c[j], scale));
        if (q > qmax) q = qmax;
        const double d = __dsub_rn(c[j], __dmul_rn(q, scale));
        total = __fma_rn(__dmul_rn(d, d), w[j], total);
    }
    errors[i] = total;
}
"""

def available(device: torch.device) -> bool:
    """Whether :func:`mse_scores` runs its kernel on ``device``."""
    return device.type == "cuda" and compiled(_SOURCE, "ql_mse_scores", device) is not None


def mse_scores(centres: torch.Tensor, weights: torch.Tensor, used: torch.Tensor, row_of: torch.Tensor,
               candidates: torch.Tensor, qmax: float) -> Optional[torch.Tensor]:
    """Each candidate's weighted squared error, or None where the kernel cannot run.

    Args:
        centres: ``[rows, width]`` float64, each row's used bin centres left-aligned.
        weights: ``[rows, width]`` float64, their counts.
        used: ``[rows]`` int64, how many bins of each row are used.
        row_of: ``[n]`` int64, the row of each candidate.
        candidates: ``[n]`` float64 amax candidates; a NaN one scores ``inf`` (absent).
        qmax: The largest quantized magnitude (127 for 8 bits).
    """
    device = candidates.device
    n = candidates.numel()
    if device.type != "cuda" or n == 0 or n >= 2**31 or centres.shape[1] >= 2**31:
        return None
    kernel = compiled(_SOURCE, "ql_mse_scores", device)
    if kernel is None:
        return None
    f64, i64 = torch.float64, torch.int64
    tensors = kernel_args((centres, weights, used, row_of, candidates), (f64, f64, i64, i64, f64))
    if tensors is None:
        return None
    errors = torch.empty(n, dtype=torch.float64, device=device)
    launch(kernel, device, (n + _THREADS - 1) // _THREADS, _THREADS,
           [*tensors, int(centres.shape[1]), int(n), float(qmax), 1.0 / float(qmax), errors])
    return errors


__all__ = ["available", "mse_scores"]
