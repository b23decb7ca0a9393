"""A fused C loop for the statistics pass on the CPU: one read of an activation to count it.

The torch-op host path makes about nine passes over each activation (abs, max,
scale, ceil, int conversion, and bincount's own min/max and counting, the last
single-threaded at ~1.1 ns per element); on the Fashion-MNIST CNN that made the
statistics pass 1.6-2.0x an FP32 forward (benchmarks/RESULTS.md). Here one C
loop reads the float32 data once: bins ``ceil(|x| * scale) - 1`` computed four
at a time with SSE2, counted into four interleaved private histograms (so that
runs of equal values do not wait on their own increments), while it tracks the
max of |x| and how many values lie above the bins; the counts are added only if
none does (otherwise the caller widens the range and counts again). Large
tensors are split over PyTorch's intra-op threads with OpenMP: built with
``-fopenmp``, the library needs ``libgomp.so.1``, which is the name of the
OpenMP runtime that PyTorch's Linux wheels load, so the parts run on PyTorch's
own (still spinning) workers; threads of our own competed with those and made
the pass slower. With another OpenMP runtime a second one is loaded (correct,
slower). The arithmetic is the host path's (float32 multiply by the power-of-two
reciprocal, ceil), so the counts are identical (tests/quantlab/test_statistics.py).

The C source is compiled once per machine with the system C compiler (``cc``,
Debian's gcc) into the quantlab cache folder, written atomically and keyed by the
source, compiler and flags; where no compiler works, :func:`count_function`
returns None and callers keep the torch ops.
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
from quantlab._io import default_cache_dir

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

/* Counts x[0:n] into out[0:size] (overwritten); the max of the |x| bits and the number of
   values above the bins through the pointers. Returns 0 on success. */
static int count_range(const float* x, int64_t n, float scale, int64_t size, int64_t* out, uint32_t* max_bits,
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

/* ql_count_f32: count_range over x[0:n] (n < 2**32 per thread), split over `threads` OpenMP
   threads, added into counts[0:size] only if no value lies above the bins and none is NaN/Inf
   (else counts stay as they were: the caller recounts at a wider range, or reports the NaN). Built with -fopenmp, this library needs "libgomp.so.1", the name of the OpenMP
   runtime PyTorch already loaded, so the parts run on PyTorch's own (already spinning) worker
   threads; a thread of our own competed with them and made the pass slower. */
#define MAX_THREADS 64
int ql_count_f32(const float* x, int64_t n, float scale, int64_t size, int64_t* counts, uint32_t* max_bits,
                 int64_t* above, int threads) {
    if (threads < 1 || n < 262144) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t* parts = (int64_t*)calloc((size_t)(threads * size), sizeof(int64_t));
    if (!parts) return 1;
    uint32_t highs[MAX_THREADS] = {0};
    int64_t aboves[MAX_THREADS] = {0};
    int failed[MAX_THREADS] = {0};
    const int64_t chunk = (n + threads - 1) / threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
    for (int t = 0; t < threads; ++t) {
        const int64_t start = t * chunk < n ? t * chunk : n;
        const int64_t stop = start + chunk < n ? start + chunk : n;
        failed[t] = count_range(x + start, stop - start, scale, size, parts + t * size, &highs[t], &aboves[t]);
    }
    int bad = 0;
    uint32_t high = 0;
    int64_t over = 0;
    for (int t = 0; t < threads; ++t) {
        bad |= failed[t];
        high = highs[t] > high ? highs[t] : high;
        over += aboves[t];
    }
    if (!bad && over == 0 && high < 0x7f800000u)  /* in range and no NaN/Inf */
        for (int t = 0; t < threads; ++t)
            for (int64_t b = 0; b < size; ++b) counts[b] += parts[t * size + b];
    free(parts);
    *max_bits = high;
    *above = over;
    return bad;
}
"""

_LOCK = threading.Lock()
_FUNCTION: "Optional[Callable] | bool" = False  # False: not tried yet; None: unavailable


def _compiler() -> str:
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    return compiler if shutil.which(compiler) is not None else "cc"


def _use_openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info()


def _build(target: Path) -> None:
    compiler = _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder, atomic_path(target) as tmp:
        source = Path(folder) / "ql_count.c"
        source.write_text(_SOURCE)
        command = [compiler, "-O3", "-fno-math-errno", "-shared", "-fPIC", "-o", str(tmp), str(source)]
        try:  # OpenMP where PyTorch uses it (GNU libgomp): the parts share PyTorch's worker threads
            if not _use_openmp():
                raise subprocess.CalledProcessError(1, command)
            subprocess.run(command[:1] + ["-fopenmp"] + command[1:], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, timeout=120)  # one thread


def count_function() -> Optional[Callable]:
    """``ql_count_f32`` from the compiled library, or None where it cannot be built (logged once)."""
    global _FUNCTION
    with _LOCK:
        if _FUNCTION is False:
            key = "\n".join([_SOURCE, _compiler(), str(_use_openmp())])
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            target = default_cache_dir() / "kernels" / f"ql_count_{digest}.so"
            try:
                if not target.exists():
                    _build(target)
                function = ctypes.CDLL(str(target)).ql_count_f32
                function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
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
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.numel() < 1 << 31


def add_counts(x: torch.Tensor, scale: float, counts: torch.Tensor) -> "Optional[Tuple[float, int]]":
    """Counts ``x`` (fewer than 2**31 values) into int64 ``counts`` at bins ``1 / scale`` wide, in one read.

    Returns:
        ``(max of |x|, number of values above the bins)``; ``counts`` changed only if the
        latter is 0 and the max finite. None where the C loop is unavailable. A NaN in ``x``
        gives a NaN max.
    """
    function = count_function()
    if function is None:
        return None
    high, above = ctypes.c_uint32(0), ctypes.c_int64(0)
    if function(x.data_ptr(), x.numel(), scale, counts.numel(), counts.data_ptr(), ctypes.byref(high),
                ctypes.byref(above), torch.get_num_threads()):
        raise MemoryError("quantlab statistics: the C counting loop could not allocate its histograms")
    return struct.unpack("<f", struct.pack("<I", high.value))[0], above.value
