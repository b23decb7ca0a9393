"""A fused C loop for the statistics pass on the CPU: one read of an activation to count it.

The torch-op host path makes about nine passes over each activation (abs, max,
scale, ceil, int conversion, and bincount's own min/max and counting, the last
single-threaded at ~1.1 ns per element); on the Fashion-MNIST CNN that made the
statistics pass 1.6-2.0x an FP32 forward (benchmarks/RESULTS.md). Here the
count is one C loop over the float32 data, ``ceil(|x| * scale)`` into the bin,
split over the intra-op threads, each with four interleaved private histograms
(so that runs of equal values do not wait on their own increments); the batch
max stays a torch op (``aminmax``, vectorized). The arithmetic is the host
path's (float32 multiply by the power-of-two reciprocal, ceil), so the counts
are identical (tests/quantlab/test_statistics.py).

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
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from quantlab._io import atomic_path
from quantlab.models.cache import default_cache_dir

_LOG = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

typedef struct {
    const float* x;
    int64_t n;
    float scale;
    int64_t size;
    int64_t* out;
} job_t;

/* Bins of |x| at 1/scale-wide right-closed bins: ceil(|x| * scale) - 1, zeros in bin 0, for a
   block of values. The caller's range holds every value; one above it (only from an overflowing
   scale) is clamped so that memory stays safe. ceil is taken through an integer (floor, minus one
   where exact): libm's ceilf is a call unless the compiler may ignore FP traps. */
#define BLOCK 1024
static void bins_of(const float* x, int64_t m, float scale, float top, int32_t* bins) {
    int64_t j = 0;
#ifdef __SSE2__
    const __m128 s = _mm_set1_ps(scale), limit = _mm_set1_ps(top);
    const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    const __m128i zero = _mm_setzero_si128();
    for (; j + 4 <= m; j += 4) {
        const __m128 v = _mm_min_ps(_mm_mul_ps(_mm_and_ps(_mm_loadu_ps(x + j), abs_mask), s), limit);
        __m128i t = _mm_cvttps_epi32(v);
        t = _mm_add_epi32(t, _mm_castps_si128(_mm_cmpeq_ps(_mm_cvtepi32_ps(t), v)));  /* -1 where exact */
        t = _mm_and_si128(t, _mm_cmpgt_epi32(t, zero));
        _mm_storeu_si128((__m128i*)(bins + j), t);
    }
#endif
    for (; j < m; ++j) {
        float v = fabsf(x[j]) * scale;
        v = v < top ? v : top;
        int32_t t = (int32_t)v;
        t -= (float)t == v;
        bins[j] = t > 0 ? t : 0;
    }
}

static void* count_part(void* arg) {
    job_t* job = (job_t*)arg;
    const int64_t size = job->size;
    /* four interleaved private histograms: runs of one bin do not wait on their own increments */
    uint32_t* lanes = (uint32_t*)calloc((size_t)(4 * size), sizeof(uint32_t));
    if (!lanes) return (void*)1;
    int32_t bins[BLOCK];
    for (int64_t i = 0; i < job->n; i += BLOCK) {
        const int64_t m = job->n - i < BLOCK ? job->n - i : BLOCK;
        bins_of(job->x + i, m, job->scale, (float)size, bins);
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
        job->out[b] = (int64_t)lanes[b] + lanes[size + b] + lanes[2 * size + b] + lanes[3 * size + b];
    free(lanes);
    return 0;
}

/* Adds the counts of x[0:n] (n < 2**32 per thread) into counts[0:size]. Returns 0 on success. */
int ql_count_f32(const float* x, int64_t n, float scale, int64_t size, int64_t* counts, int threads) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (n < 65536 * (int64_t)threads) threads = (int)(n / 65536) + 1;
    if (threads > 64) threads = 64;
    job_t jobs[64];
    pthread_t ids[64];
    int64_t* parts = (int64_t*)calloc((size_t)(threads * size), sizeof(int64_t));
    if (!parts) return 1;
    const int64_t chunk = (n + threads - 1) / threads;
    int failed = 0;
    for (int t = 0; t < threads; ++t) {
        const int64_t start = t * chunk < n ? t * chunk : n;
        const int64_t stop = start + chunk < n ? start + chunk : n;
        jobs[t] = (job_t){x + start, stop - start, scale, size, parts + t * size};
    }
    for (int t = 1; t < threads; ++t)
        if (pthread_create(&ids[t], 0, count_part, &jobs[t])) { count_part(&jobs[t]); ids[t] = 0; }
    failed |= count_part(&jobs[0]) != 0;
    for (int t = 1; t < threads; ++t) {
        void* result = 0;
        if (ids[t]) pthread_join(ids[t], &result);
        failed |= result != 0;
    }
    for (int t = 0; t < threads; ++t)
        for (int64_t b = 0; b < size; ++b) counts[b] += parts[t * size + b];
    free(parts);
    return failed;
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
        subprocess.run([compiler, "-O3", "-fno-math-errno", "-shared", "-fPIC", "-pthread", "-o", str(tmp), str(source)],
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
                function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int64,
                                     ctypes.c_void_p, ctypes.c_int]
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


def add_counts(x: torch.Tensor, scale: float, counts: torch.Tensor) -> bool:
    """Adds the counts of ``x`` at bins ``1 / scale`` wide into int64 ``counts`` (contiguous, CPU).

    Returns False (nothing added) where the C loop is unavailable.
    """
    function = count_function()
    if function is None:
        return False
    threads = torch.get_num_threads()
    flat = x.view(-1)
    step = (1 << 31) * threads  # each thread's part stays below 2**32
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        if function(part.data_ptr(), part.numel(), scale, counts.numel(), counts.data_ptr(), threads):
            raise MemoryError("quantlab statistics: the C counting loop could not allocate its histograms")
    return True
