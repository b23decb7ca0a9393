"""The ``entropy`` calibrator's divergences on a GPU in two kernel launches (used by :mod:`.entropy_many`).

The torch-op form screens every candidate with a dozen passes over ``[candidates, levels + 1]``
float64 blocks, reads the near set back to size its term-by-term blocks, and reads again
before deciding: three read-backs and ~100 launches for a model. Here:

* ``ql_entropy_screen``: one thread per candidate threshold computes the screening formula of
  :func:`.entropy_many._screen` (prefix sums per level; the sum over levels in level order).
* ``ql_entropy_exact``: one block per candidate; a candidate outside the near set (a mask
  computed on the device, so nothing is read back) returns at once; a near one is scored term
  by term as :func:`.entropy_many._exact` scores it: the level means from exact integer prefix
  sums (the same floats as its scatter sums), ``q`` spread over the non-empty bins, ``p`` with
  the clipped mass on bin ``i - 1``, both normalized, ``p * log(p / q)`` where ``p > 0``, each
  operation with its own IEEE rounding (``__ddiv_rn``/``__dmul_rn``: no fused operations).
  Only the two sums (``q``'s total and the terms) are taken in another order (a block
  reduction), which the tie bound of :mod:`.entropy_many` already covers; the bound also covers
  a ``log`` that differed from PyTorch's by an ulp (it allows ``8 * eps * (i + 3)`` relative
  to the terms' magnitudes, an ulp per term costs at most ``eps``).

Compiled at run time (:mod:`._nvrtc`); where that is missing or fails, the functions return
None and the torch-op form runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._nvrtc import compiled, kernel_args, launch

#: Threads per block of both kernels (the exact kernel's block reduction assumes a power of two).
_THREADS = 128
#: The exact kernel keeps a candidate's level means in shared memory: at most this many levels.
MAX_LEVELS = 1024

_SOURCE = r"""
#define QL_THREADS 128
#define QL_MAX_LEVELS 1024

__device__ __forceinline__ double ql_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

// x * log(x) for x > 0, else 0 (entropy_many._xlogx).
__device__ __forceinline__ double ql_xlogx(double x) { return x > 0.0 ? __dmul_rn(x, log(x)) : 0.0; }

extern "C" __global__ void __launch_bounds__(QL_THREADS)
ql_entropy_screen(const double* bins, const double* cum_b, const double* cum_n, const double* cum_blogb,
                  const double* total, const double* log_total, const long long* seg,
                  const long long* thresholds, int width, int levels, int n, double* out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    const long long r = seg[c];
    const long long i = thresholds[c];
    const long long stride = (long long)width + 1;
    const double* cb = cum_b + r * stride;
    const double* cn = cum_n + r * stride;
    // Level j holds bins ceil(j*i/L) .. ceil((j+1)*i/L) - 1 (contiguous).
    const long long last_level = ((i - 1) * levels) / i;
    double s_log_m = 0.0, log_m_last = 0.0;
    double b_lo = cb[0], n_lo = cn[0];
    for (int j = 0; j < levels; ++j) {
        const long long hi = ((long long)(j + 1) * i + levels - 1) / levels;
        const double b_hi = cb[hi], n_hi = cn[hi];
        const double level_sum = __dsub_rn(b_hi, b_lo);
        const double level_cnt = __dsub_rn(n_hi, n_lo);
        double log_mean = 0.0;
        if (level_cnt > 0.0) {
            log_mean = log(__ddiv_rn(level_sum, level_cnt));
            s_log_m = __dadd_rn(s_log_m, __dmul_rn(level_sum, log_mean));
        }
        if (j == last_level) log_m_last = log_mean;
        b_lo = b_hi;
        n_lo = n_hi;
    }
    const double kept = cb[i];
    const double row_total = total[r];
    const double clipped = __dsub_rn(row_total, kept);  // exact: integer sums
    const double b_last = bins[r * (long long)width + i - 1];
    double corr = 0.0;
    if (clipped > 0.0)
        corr = __dsub_rn(__dsub_rn(ql_xlogx(__dadd_rn(b_last, clipped)), ql_xlogx(b_last)), __dmul_rn(clipped, log_m_last));
    const double kl = __dsub_rn(__dadd_rn(__ddiv_rn(__dadd_rn(__dsub_rn(cum_blogb[r * stride + i], s_log_m), corr), row_total),
                                          log(kept)), log_total[r]);
    const bool impossible = kept <= 0.0 || (clipped > 0.0 && b_last <= 0.0);
    out[c] = impossible ? ql_inf() : kl;
}

// Sum of one value per thread of the block (QL_THREADS, a power of two); every thread gets it.
__device__ double ql_block_sum(double value, double* scratch) {
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (int step = QL_THREADS / 2; step > 0; step >>= 1) {
        if (threadIdx.x < step) scratch[threadIdx.x] = scratch[threadIdx.x] + scratch[threadIdx.x + step];
        __syncthreads();
    }
    const double sum = scratch[0];
    __syncthreads();
    return sum;
}

extern "C" __global__ void __launch_bounds__(QL_THREADS)
ql_entropy_exact(const double* bins, const double* cum_b, const double* cum_n, const double* total,
                 const long long* seg, const long long* thresholds, const unsigned char* near, int width,
                 int levels, int n, double sum_bound, double* divergence, double* bound, unsigned char* exact) {
    __shared__ double mean[QL_MAX_LEVELS];
    __shared__ double scratch[QL_THREADS];
    const int c = blockIdx.x;
    if (c >= n) return;
    if (!near[c]) {  // scored by screening alone: never the minimum, never a close rival
        if (threadIdx.x == 0) {
            divergence[c] = ql_inf();
            bound[c] = 0.0;
            exact[c] = 0;
        }
        return;
    }
    const long long r = seg[c];
    const long long i = thresholds[c];
    const long long stride = (long long)width + 1;
    const double* b = bins + r * (long long)width;
    const double* cb = cum_b + r * stride;
    const double* cn = cum_n + r * stride;
    // Level sums and non-empty counts: differences of integer prefix sums, exact (the scatter sums' floats).
    for (int j = threadIdx.x; j < levels; j += QL_THREADS) {
        const long long lo = ((long long)j * i + levels - 1) / levels;
        const long long hi = ((long long)(j + 1) * i + levels - 1) / levels;
        const double count = __dsub_rn(cn[hi], cn[lo]);
        mean[j] = __ddiv_rn(__dsub_rn(cb[hi], cb[lo]), count < 1.0 ? 1.0 : count);
    }
    __syncthreads();
    double q_part = 0.0;
    int fractional = 0;
    for (long long k = threadIdx.x; k < i; k += QL_THREADS) {
        const double q = b[k] > 0.0 ? mean[(k * levels) / i] : 0.0;
        q_part += q;
        fractional |= q != floor(q);
    }
    const double q_total = ql_block_sum(q_part, scratch);
    const int q_integer = !__syncthreads_or(fractional);
    const double row_total = total[r];  // p's total: integers, exact in any order
    const double clipped = __dsub_rn(row_total, cb[i]);
    double term_sum = 0.0, term_abs = 0.0, nonzero = 0.0;
    for (long long k = threadIdx.x; k < i; k += QL_THREADS) {
        const double bk = b[k];
        const double p = __ddiv_rn(k == i - 1 ? __dadd_rn(bk, clipped) : bk, row_total);
        const double q = __ddiv_rn(bk > 0.0 ? mean[(k * levels) / i] : 0.0, q_total);
        const double term = p > 0.0 ? __dmul_rn(p, log(__ddiv_rn(p, q))) : 0.0;
        term_sum += term;
        term_abs += fabs(term);
        nonzero += term != 0.0 ? 1.0 : 0.0;
    }
    term_sum = ql_block_sum(term_sum, scratch);
    term_abs = ql_block_sum(term_abs, scratch);
    nonzero = ql_block_sum(nonzero, scratch);
    if (threadIdx.x == 0) {
        divergence[c] = q_total > 0.0 ? term_sum : ql_inf();
        bound[c] = sum_bound * (double)(i + 3) * (1.0 + term_abs);
        exact[c] = q_integer && nonzero <= 1.0;
    }
}
"""


def _ready(device: torch.device, levels: int, n: int, name: str) -> Optional[object]:
    # The screen kernel's int thread index must not overflow in the last block.
    if device.type != "cuda" or n == 0 or n >= 2**31 - _THREADS or not 1 <= levels <= MAX_LEVELS:
        return None
    return compiled(_SOURCE, name, device)


def screen(bins: torch.Tensor, cum_b: torch.Tensor, cum_n: torch.Tensor, cum_blogb: torch.Tensor,
           total: torch.Tensor, log_total: torch.Tensor, seg: torch.Tensor, thresholds: torch.Tensor,
           levels: int) -> Optional[torch.Tensor]:
    """Each candidate's screened divergence (see :func:`.entropy_many._screen`), or None where the kernel cannot run.

    Args:
        bins: ``[rows, width]`` float64 counts (bin-0 quirk applied), zero-padded.
        cum_b, cum_n, cum_blogb: ``[rows, width + 1]`` float64 prefix sums of the counts, of
            the non-empty indicator and of ``b log b``.
        total, log_total: ``[rows]`` float64 count totals and their logs.
        seg, thresholds: ``[n]`` int64 row and threshold bin of every candidate.
        levels: ``2 ** (num_bits - 1)``.
    """
    device = thresholds.device
    n = thresholds.numel()
    kernel = _ready(device, levels, n, "ql_entropy_screen")
    tensors = kernel_args((bins, cum_b, cum_n, cum_blogb, total, log_total, seg, thresholds), [torch.float64] * 6 + [torch.int64] * 2)
    if kernel is None or tensors is None:
        return None
    out = torch.empty(n, dtype=torch.float64, device=device)
    launch(kernel, device, (n + _THREADS - 1) // _THREADS, _THREADS, [*tensors, int(bins.shape[1]), int(levels), int(n), out])
    return out


def exact(bins: torch.Tensor, cum_b: torch.Tensor, cum_n: torch.Tensor, total: torch.Tensor, seg: torch.Tensor,
          thresholds: torch.Tensor, near: torch.Tensor, levels: int,
          sum_bound: float) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Term-by-term divergences of the ``near`` candidates (see :func:`.entropy_many._exact`).

    Returns:
        ``(divergence, bound, exact)`` over all candidates: ``inf``, 0 and False outside
        the near set; or None where the kernel cannot run.
    """
    device = thresholds.device
    n = thresholds.numel()
    kernel = _ready(device, levels, n, "ql_entropy_exact")
    tensors = kernel_args((bins, cum_b, cum_n, total, seg, thresholds), [torch.float64] * 4 + [torch.int64] * 2)
    if kernel is None or tensors is None:
        return None
    divergence = torch.empty(n, dtype=torch.float64, device=device)
    bound = torch.empty(n, dtype=torch.float64, device=device)
    is_exact = torch.empty(n, dtype=torch.uint8, device=device)
    launch(kernel, device, n, _THREADS, [*tensors, near.to(torch.uint8).contiguous(), int(bins.shape[1]),
                                         int(levels), int(n), float(sum_bound), divergence, bound, is_exact])
    return divergence, bound, is_exact.bool()


__all__ = ["MAX_LEVELS", "exact", "screen"]
