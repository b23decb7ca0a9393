"""A fused C loop for the statistics pass on the CPU: one read of an activation to count it.

The torch-op host path makes about nine passes over each activation (abs, max,
scale, ceil, int conversion, and bincount's own min/max and counting, the last
single-threaded at ~1.1 ns per element); on the Fashion-MNIST CNN that made the
statistics pass 1.6-2.0x an FP32 forward (benchmarks/RESULTS.md). Here the
count is one C loop over the float32 data: bins ``ceil(|x| * scale) - 1``
computed four at a time with SSE2, then counted into four interleaved private
histograms (so that runs of equal values do not wait on their own increments);
the batch max stays a torch op (``aminmax``, vectorized). One thread: a second
one competed with PyTorch's spinning OpenMP workers and made the pass slower.
The arithmetic is the host path's (float32 multiply by the power-of-two
reciprocal, ceil), so the counts are identical (tests/quantlab/test_statistics.py).

The C source is compiled once per machine with the system C compiler (``cc``,
Debian's gcc) into the quantlab cache folder, written atomically; where no
compiler works, :func:`count_function` returns None and callers keep the torch ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from quantlab._io import atomic_path
from quantlab.models.cache import default_cache_dir

_LOG = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* Bins of |x| at 1/scale-wide right-closed bins, ceil(|x| * scale) - 1 with zeros in bin 0, for a
   block of values; also the max of the |x| bits (unsigned order is numeric order for |x|, NaN
   last) and how many values lie above the bins (those are clamped into the last bin, and the
   caller recounts). ceil through an integer (floor, minus one where exact): libm's ceilf is a
   call unless the compiler may ignore FP traps. */
#define BLOCK 1024
static int64_t bins_of(const float* x, int64_t m, float scale, float top, int32_t* bins, uint32_t* max_bits) {
    int64_t j = 0, above = 0;
    uint32_t high = *max_bits;
#ifdef __SSE2__
    const __m128 s = _mm_set1_ps(scale), limit = _mm_set1_ps(top);
    const __m128i abs_mask = _mm_set1_epi32(0x7fffffff);
    const __m128i zero = _mm_setzero_si128();
    __m128i high4 = _mm_setzero_si128();  /* |x| bits are non-negative as int32 */
    __m128i above4 = _mm_setzero_si128();  /* minus the count per lane (a true compare is -1) */
    for (; j + 4 <= m; j += 4) {
        const __m128i bits = _mm_and_si128(_mm_loadu_si128((const __m128i*)(x + j)), abs_mask);
        const __m128i greater = _mm_cmpgt_epi32(bits, high4);
        high4 = _mm_or_si128(_mm_and_si128(greater, bits), _mm_andnot_si128(greater, high4));
        const __m128 scaled = _mm_mul_ps(_mm_castsi128_ps(bits), s);
        above4 = _mm_add_epi32(above4, _mm_castps_si128(_mm_cmpgt_ps(scaled, limit)));
        const __m128 v = _mm_min_ps(scaled, limit);
        __m128i t = _mm_cvttps_epi32(v);
        t = _mm_add_epi32(t, _mm_castps_si128(_mm_cmpeq_ps(_mm_cvtepi32_ps(t), v)));  /* -1 where exact */
        t = _mm_and_si128(t, _mm_cmpgt_epi32(t, zero));
        _mm_storeu_si128((__m128i*)(bins + j), t);
    }
    uint32_t lanes[4];
    int32_t counts[4];
    _mm_storeu_si128((__m128i*)lanes, high4);
    _mm_storeu_si128((__m128i*)counts, above4);
    for (int k = 0; k < 4; ++k) {
        high = lanes[k] > high ? lanes[k] : high;
        above -= counts[k];
    }
#endif
    for (; j < m; ++j) {
        uint32_t bits;
        memcpy(&bits, x + j, 4);
        bits &= 0x7fffffffu;
        high = bits > high ? bits : high;
        float v;
        memcpy(&v, &bits, 4);
        v *= scale;
        above += v > top;
        v = v < top ? v : top;
        int32_t t = (int32_t)v;
        t -= (float)t == v;
        bins[j] = t > 0 ? t : 0;
    }
    *max_bits = high;
    return above;
}

/* Counts x[0:n] (n < 2**32) into out[0:size] (overwritten), and returns through the pointers the
   max of the |x| bits and the number of values above the bins (0: the counts are exact).
   Returns 0 on success. One thread: a second one (pthread) made the pass slower, competing with
   PyTorch's spinning OpenMP workers (benchmarks/RESULTS.md). */
int ql_count_f32(const float* x, int64_t n, float scale, int64_t size, int64_t* out, uint32_t* max_bits,
                 int64_t* above) {
    /* four interleaved private histograms: runs of one bin do not wait on their own increments */
    uint32_t* lanes = (uint32_t*)calloc((size_t)(4 * size), sizeof(uint32_t));
    if (!lanes) return 1;
    int32_t bins[BLOCK];
    uint32_t high = 0;
    int64_t over = 0;
    for (int64_t i = 0; i < n; i += BLOCK) {
        const int64_t m = n - i < BLOCK ? n - i : BLOCK;
        over += bins_of(x + i, m, scale, (float)size, bins, &high);
        int64_t j = 0;
        for (; j + 4 <= m; j += 4) {
            lanes[bins[j]] += 1;
            lanes[size + bins[j + 1]] += 1;
            lanes[2 * size + bins[j + 2]] += 1;
            lanes[3 * size + bins[j + 3]] += 1;
        }
        for (; j < m; ++j) lanes[bins[j]] += 1;
    }
    for (int64_t b = 0; b < size; ++b)
        out[b] = (int64_t)lanes[b] + lanes[size + b] + lanes[2 * size + b] + lanes[3 * size + b];
    free(lanes);
    *max_bits = high;
    *above = over;
    return 0;
}
"""

_LOCK = threading.Lock()
_FUNCTION: "Optional[Callable] | bool" = False  # False: not tried yet; None: unavailable


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        compiler = "cc"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder, atomic_path(target) as tmp:
        source = Path(folder) / "ql_count.c"
        source.write_text(_SOURCE)
        subprocess.run([compiler, "-O3", "-fno-math-errno", "-shared", "-fPIC", "-o", str(tmp), str(source)],
                       check=True, capture_output=True, timeout=120)


def count_function() -> Optional[Callable]:
    """``ql_count_f32`` from the compiled library, or None where it cannot be built (logged once)."""
    global _FUNCTION
    with _LOCK:
        if _FUNCTION is False:
            digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
            target = default_cache_dir() / "kernels" / f"ql_count_{digest}.so"
            try:
                if not target.exists():
                    _build(target)
                function = ctypes.CDLL(str(target)).ql_count_f32
                function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_int64)]
                function.restype = ctypes.c_int
                _FUNCTION = function
            except (OSError, subprocess.SubprocessError, AttributeError) as error:
                detail = getattr(error, "stderr", b"") or b""
                _LOG.warning("fused CPU statistics loop unavailable (%s %s); using torch ops",
                             error, detail.decode(errors="replace")[:200])
                _FUNCTION = None
        return _FUNCTION  # type: ignore[return-value]


def takes(x: torch.Tensor) -> bool:
    """Whether the C loop can read this batch in place."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def count(x: torch.Tensor, scale: float, size: int) -> "Optional[Tuple[torch.Tensor, float, int]]":
    """Counts ``x`` into ``size`` bins ``1 / scale`` wide, in one read.

    Returns:
        ``(int64 counts, max of |x|, number of values above the bins)`` (those were
        clamped into the last bin: the counts are exact only when it is 0), or None where
        the C loop is unavailable. A NaN in ``x`` gives a NaN max.
    """
    function = count_function()
    if function is None:
        return None
    flat = x.view(-1)
    total = torch.zeros(size, dtype=torch.int64)
    part = torch.empty(size, dtype=torch.int64)
    high, above = ctypes.c_uint32(0), ctypes.c_int64(0)
    max_bits, total_above = 0, 0
    step = 1 << 31  # the loop's per-bin counters are 32-bit
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        if function(chunk.data_ptr(), chunk.numel(), scale, size, part.data_ptr(), ctypes.byref(high), ctypes.byref(above)):
            raise MemoryError("quantlab statistics: the C counting loop could not allocate its histogram")
        total += part
        max_bits, total_above = max(max_bits, high.value), total_above + above.value
    return total, struct.unpack("<f", struct.pack("<I", max_bits))[0], total_above
