"""Fused CUDA kernels for the statistics pass: one read of an activation per batch.

The torch-op version of :class:`quantlab.statistics._DeviceAccumulator` makes
about eight passes over every activation (abs, max, scale, ceil, histc, with
their writes) and launches about 20 kernels, each costing 20-50 us of host time
on a GPU host; on a ResNet-50 that made the statistics pass 2.4x-3.7x an FP32
forward (benchmarks/RESULTS.md). Here one kernel (``ql_pass``) reads the batch
once and, per value, takes the max and counts ``ceil(|x| * 2**-e)`` in a
shared-memory histogram at the exponent ``e`` the range had before the batch.
Values above that range (rare once the range has settled) go to a short list.
The last block to finish sets the new range and moves the counts to it: bin
``i`` goes to ``i >> shift``, exact because ``ceil(ceil(v / w) / 2**k) =
ceil(v / (2**k w))``; then it counts the listed values at the new width. If
the list overflowed, that block reads the batch again for those values (rare:
once the range has settled, few values exceed it). The first batch of a tensor
takes its max first (``ql_absmax``), so nothing falls outside. One launch per
batch (two for the first), no read-back.

Same float32 multiply and ceil as the torch ops, zeros, NaN and Inf skipped as
there (zeros are counted from the element total; a NaN/Inf sticks in the
running max), so the counts equal the host path's exactly (checked on the H100
by tests/quantlab/test_statistics_cuda.py and benchmarks/profile_statistics.py).
The kernels are compiled at run time with NVRTC (shipped with PyTorch's CUDA
builds; no compiler needed), through PyTorch's private ``torch.cuda._utils``
helpers; where that fails, :func:`kernels_for` returns None and callers keep
the torch ops.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Dict, Optional, Tuple

import torch

_LOG = logging.getLogger(__name__)

# dtype -> the kernels' KIND template argument.
KIND_OF = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Bins held in one block's shared memory (uint32 counts; float64 for the re-binning).
MAX_BINS = 4096
_THREADS = 512  # the pass keeps MAX_BINS / _THREADS <= 16 re-binned counts per thread
# Values above the running range collected per batch before falling back to a second read.
OVERFLOW_CAPACITY = 4096
# Defaults of HistogramKernels (measured on the H200: benchmarks/RESULTS.md, issue 18).
UNROLL = 4
GROUP_VOTE = True
LOAD = 2
MIN_ELEMENTS_PER_BLOCK = 2048

_SOURCE = r"""
// QL_LOAD 0: plain loads; 1: through the read-only cache (__ldg); 2: streaming, evict first (__ldcs).
#if QL_LOAD == 1
#define QL_LOAD_VECTOR(p) __ldg(p)
#elif QL_LOAD == 2
#define QL_LOAD_VECTOR(p) __ldcs(p)
#else
#define QL_LOAD_VECTOR(p) (*(p))
#endif

// KIND 0: float32, 1: float16, 2: bfloat16. Values are handled as the float32 bits of |x|:
// for non-negative floats (Inf and NaN included) unsigned order is numeric order, NaN last.
__device__ __forceinline__ unsigned f16_abs_as_f32_bits(unsigned short h) {
    float f;
    unsigned short a = (unsigned short)(h & 0x7fffu);
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(a));
    return __float_as_uint(f);
}

template <int KIND> struct Vec { static const int PER = 8; };
template <> struct Vec<0> { static const int PER = 4; };

// 16 bytes -> the |x| bits of the values in them.
template <int KIND>
__device__ __forceinline__ void decode(const uint4 v, unsigned out[8]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
    if (KIND == 0) {
        for (int k = 0; k < 4; ++k) out[k] = w[k] & 0x7fffffffu;
    } else if (KIND == 2) {
        for (int k = 0; k < 4; ++k) {
            out[2 * k] = (w[k] & 0x7fffu) << 16;
            out[2 * k + 1] = (w[k] >> 16 & 0x7fffu) << 16;
        }
    } else {
        for (int k = 0; k < 4; ++k) {
            out[2 * k] = f16_abs_as_f32_bits((unsigned short)(w[k] & 0xffffu));
            out[2 * k + 1] = f16_abs_as_f32_bits((unsigned short)(w[k] >> 16));
        }
    }
}

template <int KIND>
__device__ __forceinline__ unsigned scalar_at(const void* x, long long i) {
    if (KIND == 0) return ((const unsigned*)x)[i] & 0x7fffffffu;
    unsigned short h = ((const unsigned short*)x)[i];
    if (KIND == 2) return ((unsigned)h & 0x7fffu) << 16;
    return f16_abs_as_f32_bits(h);
}

// 2**-e from its bit pattern (e in [-126, 126]): exact.
__device__ __forceinline__ float inverse_width(int e) { return __uint_as_float((unsigned)(127 - e) << 23); }

// The exponent of the bin width for a running max: the frexp exponent of the float just below
// it, minus log2(size) (the torch path's formula); a max of 0 keeps the old exponent so that the
// exponent never decreases (the counts are empty then, so the torch path ends the same).
__device__ __forceinline__ int exponent_for(float m, int old, int size_log2, int min_e, int max_e) {
    if (m == 0.0f) return old;
    int e;
    frexpf(nextafterf(m, 0.0f), &e);
    return min(max(e - size_log2, min_e), max_e);
}

__device__ __forceinline__ float sticky_max(float a, float b) {
    return (isnan(a) || isnan(b)) ? __uint_as_float(0x7fc00000u) : fmaxf(a, b);
}

__device__ __forceinline__ unsigned block_max(unsigned m) {
    __shared__ unsigned warp_max[32];
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_max[warp] = m;
    __syncthreads();
    m = lane < (blockDim.x + 31) / 32 ? warp_max[lane] : 0u;
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    return m;  // valid in every warp
}

// meta: [0] batch max (float bits), [1] blocks done, [2] values above the old range.
#define BATCH_MAX 0
#define DONE 1
#define OVERFLOW 2

// Calls fast(bits) for every value of x this thread handles (start at `first`, step `stride`):
// the 16-byte vectors, then the scalar tail; grid-stride for the passes, block-stride for the
// last block's re-read. fast returns whether the value also needs slow(bits) (in the pass: above
// the range, rare once the range has settled). slow may use warp-wide operations: every active
// lane calls it on the same value slots. With QL_GROUP_VOTE the warp votes once per QL_UNROLL
// loaded vectors (and then runs slow on all of them), else once per value.
// QL_UNROLL vectors are loaded before any is counted, so each thread keeps that many 16-byte
// loads in flight: with one, the loop waited on every load (1.3-2.0 TB/s on large activations
// on the H100). Neither changes the counts: only which thread counts which value, and when.
template <int KIND, typename F, typename G>
__device__ __forceinline__ void for_each_value(const void* x, long long n, long long first, long long stride,
                                               F fast, G slow) {
    const int PER = Vec<KIND>::PER;
    const long long nvec = n / PER;
    const uint4* v = (const uint4*)x;
    unsigned vals[8];
    long long i = first;
    for (; i + (QL_UNROLL - 1) * stride < nvec; i += QL_UNROLL * stride) {
        uint4 loaded[QL_UNROLL];
#pragma unroll
        for (int u = 0; u < QL_UNROLL; ++u) loaded[u] = QL_LOAD_VECTOR(v + i + u * stride);
        bool any = false;
#pragma unroll
        for (int u = 0; u < QL_UNROLL; ++u) {
            decode<KIND>(loaded[u], vals);
            for (int k = 0; k < PER; ++k) {
#if QL_GROUP_VOTE
                any |= fast(vals[k]);
#else
                if (__any_sync(__activemask(), fast(vals[k]))) slow(vals[k]);
#endif
            }
        }
        if (QL_GROUP_VOTE && __any_sync(__activemask(), any)) {
            for (int u = 0; u < QL_UNROLL; ++u) {
                decode<KIND>(loaded[u], vals);
                for (int k = 0; k < PER; ++k) slow(vals[k]);
            }
        }
    }
    for (; i < nvec; i += stride) {
        decode<KIND>(v[i], vals);
        for (int k = 0; k < PER; ++k)
            if (__any_sync(__activemask(), fast(vals[k]))) slow(vals[k]);
    }
    for (long long j = nvec * PER + first; j < n; j += stride) {
        const unsigned bits = scalar_at<KIND>(x, j);
        if (__any_sync(__activemask(), fast(bits))) slow(bits);
    }
}

// for_each_value with nothing to do beyond f.
template <int KIND, typename F>
__device__ __forceinline__ void for_each(const void* x, long long n, long long first, long long stride, F f) {
    for_each_value<KIND>(x, n, first, stride, [&](unsigned bits) { f(bits); return false; }, [](unsigned) {});
}

// Also empties the state (a tensor's first batch: fresh or reused after a read).
template <int KIND>
__device__ void absmax_impl(const void* x, int n, unsigned* meta, float* amax, int* exponent,
                            double* counts, int size, int min_e) {
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < size; i += blockDim.x) counts[i] = 0.0;
        if (threadIdx.x == 0) {
            *amax = 0.0f;
            *exponent = min_e;
        }
    }
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned m = 0;
    for_each<KIND>(x, n, first, stride, [&](unsigned bits) { m = max(m, bits); });
    m = block_max(m);
    if (threadIdx.x == 0 && m) atomicMax(&meta[BATCH_MAX], m);
}

// Counts one value if it is in range (the block's histogram); returns whether it lies above the
// range at this exponent.
__device__ __forceinline__ bool count_in_range(unsigned bits, float scale, float top, unsigned* hist) {
    const float s = ceilf(__uint_as_float(bits) * scale);  // 0 for zeros, else 1 + bin; NaN fails all
    if (s >= 1.0f && s <= top) atomicAdd(&hist[(int)s - 1], 1u);
    return s > top;
}

// Appends a value above the range to the overflow list (warp-aggregated: every active lane calls
// this for the same value slot; once the list is full only the count grows).
__device__ __forceinline__ void list_over(unsigned bits, bool over, unsigned* meta, float* overflow,
                                          int capacity, bool* full) {
    const unsigned active = __activemask();
    const unsigned mask = __ballot_sync(active, over);
    if (!over) return;
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(mask) - 1;
    unsigned base = 0;
    if (lane == leader) base = *full ? 0xffffffffu : atomicAdd(&meta[OVERFLOW], __popc(mask));
    base = __shfl_sync(mask, base, leader);
    if (base == 0xffffffffu) return;
    const unsigned slot = base + __popc(mask & ((1u << lane) - 1u));
    if (slot < (unsigned)capacity) overflow[slot] = __uint_as_float(bits);
    else *full = true;
}

// One pass over x. Normal mode: counts at the exponent the range had before this batch, the batch
// max on the side, values above the range into a list; the last block to finish moves the counts
// to the new exponent (bin i -> i >> shift: exact, ceil(ceil(v/w)/2^k) = ceil(v/(2^k w))) and
// counts the listed values there; if the list overflowed, it reads the batch again for them
// (rare: once the range has settled only a few values exceed it). Max-known mode (first batch,
// counts emptied and meta[0] set by ql_absmax): counts at the new exponent, nothing above it.
template <int KIND>
__device__ void pass_impl(const void* x, int n, unsigned* meta, float* amax, int* exponent,
                          double* counts, float* overflow, int size, int size_log2, int min_e,
                          int max_e, int capacity, int max_known) {
    extern __shared__ unsigned hist[];
    __shared__ bool full;
    __shared__ bool last;
    for (int i = threadIdx.x; i < size; i += blockDim.x) hist[i] = 0u;
    if (threadIdx.x == 0) full = false;
    __syncthreads();
    const int old_e = *exponent;
    const float m_known = sticky_max(*amax, __uint_as_float(meta[BATCH_MAX]));
    const int e = max_known ? exponent_for(m_known, old_e, size_log2, min_e, max_e) : old_e;
    const float scale = inverse_width(e);
    const float top = (float)size;
    const bool collect = !max_known;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned m = 0;
    for_each_value<KIND>(
        x, n, first, stride,
        [&](unsigned bits) {
            m = max(m, bits);
            return count_in_range(bits, scale, top, hist) && collect;
        },
        [&](unsigned bits) {
            list_over(bits, ceilf(__uint_as_float(bits) * scale) > top, meta, overflow, capacity, &full);
        });
    m = block_max(m);  // ends with a barrier: the block's histogram is complete
    if (threadIdx.x == 0 && m && collect) atomicMax(&meta[BATCH_MAX], m);
    for (int i = threadIdx.x; i < size; i += blockDim.x)
        if (hist[i]) atomicAdd(&counts[i], (double)hist[i]);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&meta[DONE], 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    volatile unsigned* vmeta = meta;
    volatile double* vcounts = counts;
    const float new_max = sticky_max(*amax, __uint_as_float(vmeta[BATCH_MAX]));
    const int new_e = exponent_for(new_max, old_e, size_log2, min_e, max_e);
    const int shift = min(max(new_e - old_e, 0), 62);
    const unsigned listed = vmeta[OVERFLOW];
    __syncthreads();  // every thread has read the state before thread 0 rewrites it
    if (!max_known && shift > 0) {  // move the counts to the coarser bins (registers, then write)
        double moved[16];
        int k = 0;
        for (int j = threadIdx.x; j < size; j += blockDim.x, ++k) {
            double total = 0.0;
            if (shift < 31) {
                const long long lo = (long long)j << shift;
                const long long hi = min((long long)size, lo + (1LL << shift));
                for (long long q = lo; q < hi; ++q) total += vcounts[q];
            } else if (j == 0) {
                for (int q = 0; q < size; ++q) total += vcounts[q];
            }
            moved[k] = total;
        }
        __syncthreads();
        k = 0;
        for (int j = threadIdx.x; j < size; j += blockDim.x, ++k) counts[j] = moved[k];
        __syncthreads();
    }
    const float new_scale = inverse_width(new_e);
    if (!max_known && listed <= (unsigned)capacity) {
        for (unsigned i = threadIdx.x; i < listed; i += blockDim.x) {
            const float s = ceilf(((volatile float*)overflow)[i] * new_scale);
            if (s >= 1.0f && s <= top) atomicAdd(&counts[(int)s - 1], 1.0);
        }
    } else if (!max_known) {  // the list overflowed: this block counts every value above the old range
        for (int i = threadIdx.x; i < size; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        for_each<KIND>(x, n, threadIdx.x, blockDim.x, [&](unsigned bits) {
            const float v = __uint_as_float(bits);
            if (ceilf(v * scale) > top) {
                const float s = ceilf(v * new_scale);
                if (s >= 1.0f && s <= top) atomicAdd(&hist[(int)s - 1], 1u);
            }
        });
        __syncthreads();
        for (int i = threadIdx.x; i < size; i += blockDim.x) counts[i] = vcounts[i] + (double)hist[i];
    }
    if (threadIdx.x == 0) {
        *amax = new_max;
        *exponent = new_e;
        meta[BATCH_MAX] = 0u;
        meta[DONE] = 0u;
        meta[OVERFLOW] = 0u;
    }
}

#define QL_KERNELS(SUFFIX, KIND)                                                                   \
extern "C" __global__ void __launch_bounds__(QL_THREADS) ql_absmax_##SUFFIX(                      \
        const void* x, int n, unsigned* meta, float* amax, int* exponent, double* counts, int size, \
        int min_e) {                                                                               \
    absmax_impl<KIND>(x, n, meta, amax, exponent, counts, size, min_e);                            \
}                                                                                                  \
extern "C" __global__ void __launch_bounds__(QL_THREADS) ql_pass_##SUFFIX(                        \
        const void* x, int n, unsigned* meta, float* amax, int* exponent, double* counts,         \
        float* overflow, int size, int size_log2, int min_e, int max_e, int capacity,              \
        int max_known) {                                                                           \
    pass_impl<KIND>(x, n, meta, amax, exponent, counts, overflow, size, size_log2, min_e, max_e,  \
                    capacity, max_known);                                                          \
}

QL_KERNELS(f32, 0)
QL_KERNELS(f16, 1)
QL_KERNELS(bf16, 2)
"""

_SUFFIX = {0: "f32", 1: "f16", 2: "bf16"}
_PASSES = ("absmax", "pass")


def source_defines(unroll: int, group_vote: bool, load: int) -> str:
    """The macros that set _SOURCE's launch-independent options (see HistogramKernels)."""
    # __launch_bounds__(QL_THREADS) caps the registers so that a block of _THREADS always launches
    # (unrolled half-precision loads otherwise asked for more than 128 per thread: a launch error).
    return (f"#define QL_THREADS {_THREADS}\n#define QL_UNROLL {int(unroll)}\n#define QL_GROUP_VOTE {int(group_vote)}\n"
            f"#define QL_LOAD {int(load)}\n")


def _compile(device: torch.device, unroll: int, group_vote: bool, load: int) -> Dict[str, "ctypes.c_void_p"]:
    """CUfunction handles of every kernel in _SOURCE, compiled once with NVRTC for ``device``."""
    from torch.cuda import _utils

    names = [f"ql_{p}_{s}" for p in _PASSES for s in _SUFFIX.values()]
    source = source_defines(unroll, group_vote, load) + _SOURCE
    with torch.cuda.device(device):
        try:  # one NVRTC program holds every kernel
            compiled = _utils._nvrtc_compile(source, names[0])
            binary = compiled[0] if isinstance(compiled, tuple) else compiled
            loaded = _utils._cuda_load_module(binary, names)
            return {name: loaded[name].func for name in names}
        except (AttributeError, TypeError):  # other PyTorch versions: the public-ish wrapper, per kernel
            return {name: torch.cuda._compile_kernel(source, name).func for name in names}


_LAUNCH = None


def _launch_fn():
    """``cuLaunchKernel`` from the driver, looked up once (PyTorch's helper reloads it per call)."""
    global _LAUNCH
    if _LAUNCH is None:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        fn.restype = ctypes.c_int
        _LAUNCH = fn
    return _LAUNCH


class _Launch:
    """One kernel with its argument array built once; callers update the ctypes values in place."""

    def __init__(self, func: "ctypes.c_void_p", args: list) -> None:
        self.func = func
        self.args = args  # keeps the ctypes values alive
        self.array = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self.launch = _launch_fn()  # looked up here, not per launch: this runs per layer per batch

    def __call__(self, blocks: int, shared: int, stream: "ctypes.c_void_p") -> None:
        error = self.launch(self.func, blocks, 1, 1, _THREADS, 1, 1, shared, stream, self.array, None)
        if error:
            raise RuntimeError(f"CUDA error {error} launching a quantlab statistics kernel ({blocks} blocks of {_THREADS})")


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_GET_DEVICE = getattr(torch._C, "_cuda_getDevice", None)


def current_index() -> int:
    """The current CUDA device's index (PyTorch's C getter where it has one: no lazy-init check)."""
    return _GET_DEVICE() if _GET_DEVICE is not None else torch.cuda.current_device()


def _stream_of(index: int) -> int:
    """The raw handle of device ``index``'s current stream (PyTorch's private getter: no Stream object per call)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(index)
    return torch.cuda.current_stream(index).cuda_stream


class HistogramKernels:
    """The compiled kernels of one device.

    Args:
        device: The CUDA device.
        unroll: 16-byte loads each thread issues before counting them.
        group_vote: The warp asks once per ``unroll`` loaded vectors, not per value,
            whether a value lies above the range.
        load: How the loads go: 0 plain, 1 read-only cache (``__ldg``), 2 streaming (``__ldcs``).
        blocks_per_sm: Most blocks per multiprocessor (default QUANTLAB_STATS_BLOCKS_PER_SM
            or 2): each block adds its shared histogram to the global counts once, so fewer
            blocks mean fewer global atomics, more mean more loads in flight.
        min_elements_per_block: Fewest elements a block counts: a small activation gets
            fewer blocks, each adding its histogram once (the adds cost about as much as
            reading a few MB).
    """

    def __init__(self, device: torch.device, *, unroll: int = UNROLL, blocks_per_sm: Optional[int] = None,
                 min_elements_per_block: int = MIN_ELEMENTS_PER_BLOCK, group_vote: bool = GROUP_VOTE,
                 load: int = LOAD) -> None:
        self.functions = _compile(device, unroll, group_vote, load)
        if blocks_per_sm is None:
            blocks_per_sm = int(os.environ.get("QUANTLAB_STATS_BLOCKS_PER_SM", "2"))
        self.blocks = max(1, blocks_per_sm) * torch.cuda.get_device_properties(device).multi_processor_count
        self.min_elements_per_block = max(1, min_elements_per_block)
        _launch_fn()

    def blocks_for(self, elements: int, per_vector: int) -> int:
        """Blocks for one launch over ``elements`` values (``per_vector`` in 16 bytes)."""
        per_block = max(per_vector * _THREADS, self.min_elements_per_block)
        return max(1, min(self.blocks, -(-elements // per_block)))


class FusedHistogram:
    """Runs the kernels for one accumulator's device state (updated in place).

    Args:
        kernels: The device's compiled kernels.
        amax: float32 scalar, the running max of |x|.
        exponent: int32 scalar, the bin width's exponent.
        counts: float64 counts, a power of two of them, at most MAX_BINS.
        size_log2, min_exponent, max_exponent: as in quantlab.statistics.
    """

    def __init__(self, kernels: HistogramKernels, amax: torch.Tensor, exponent: torch.Tensor, counts: torch.Tensor,
                 size_log2: int, min_exponent: int, max_exponent: int) -> None:
        device = counts.device
        self.kernels = kernels
        self.size = counts.numel()
        self.meta = torch.zeros(8, dtype=torch.int32, device=device)
        self.overflow = torch.zeros(OVERFLOW_CAPACITY, dtype=torch.float32, device=device)
        self.x = ctypes.c_void_p(0)
        self.n = ctypes.c_int(0)
        self.max_known = ctypes.c_int(0)
        self._tensors = (amax, exponent, counts)  # the addresses below stay valid while these live
        self._range = [ctypes.c_int(v) for v in (size_log2, min_exponent, max_exponent)]
        self._launches: Dict[int, Tuple[_Launch, _Launch]] = {}
        self._blocks: Dict[int, int] = {}  # (elements, 16-byte vector width) -> blocks per launch, as computed
        self._stream, self._stream_raw = ctypes.c_void_p(None), -1  # the latest launch's stream: handle, raw value
        self._shared = 4 * self.size  # bytes of shared memory of the pass: one uint32 count per bin

    def _launches_for(self, kind: int) -> Tuple[_Launch, _Launch]:
        if kind not in self._launches:  # built on first use of a dtype
            amax, exponent, counts = (ctypes.c_void_p(t.data_ptr()) for t in self._tensors)
            meta, overflow = ctypes.c_void_p(self.meta.data_ptr()), ctypes.c_void_p(self.overflow.data_ptr())
            size, capacity = ctypes.c_int(self.size), ctypes.c_int(OVERFLOW_CAPACITY)
            f, sfx = self.kernels.functions, _SUFFIX[kind]
            self._launches[kind] = (
                _Launch(f[f"ql_absmax_{sfx}"], [self.x, self.n, meta, amax, exponent, counts, size, self._range[1]]),
                _Launch(f[f"ql_pass_{sfx}"], [self.x, self.n, meta, amax, exponent, counts, overflow, size,
                                               *self._range, capacity, self.max_known]),
            )
        return self._launches[kind]

    def update(self, x: torch.Tensor, first: bool, elements: Optional[int] = None) -> None:
        """Adds one batch that :func:`readable_address` accepts, of fewer than 2**31 elements.

        Args:
            x: The batch.
            first: The first batch since the state was created or read: the state is emptied
                and the batch max taken in a separate pass first, so nothing falls above the range.
            elements: ``x.numel()``, if the caller has it.
        """
        index = x.get_device()
        if index != current_index():  # the kernels run in the data's context
            with torch.cuda.device(index):
                return self.update(x, first, elements)
        self.enqueue(x.data_ptr(), x.numel() if elements is None else elements, KIND_OF[x.dtype], first, index)

    def enqueue(self, address: int, elements: int, kind: int, first: bool, index: int) -> None:
        """:meth:`update` for a batch the caller has checked: its data at ``address`` (16-byte aligned,
        contiguous), ``elements`` values (fewer than 2**31) of kind ``kind`` (:data:`KIND_OF`), on
        device ``index``, the current device.

        This runs per quantized layer per batch: plain integers, no torch.device objects (each
        Python-level step here is host time a GPU-bound pass can hide, a host-bound one cannot).
        """
        launches = self._launches.get(kind)
        absmax, one_pass = launches if launches is not None else self._launches_for(kind)
        key = 2 * elements + (kind != 0)  # the vector width: 4 float32 or 8 half-precision values in 16 bytes
        blocks = self._blocks.get(key)
        if blocks is None:
            if len(self._blocks) >= 256:  # shapes that keep changing: start over
                self._blocks.clear()
            blocks = self._blocks[key] = self.kernels.blocks_for(elements, 4 if kind == 0 else 8)
        raw = _stream_of(index)
        if raw != self._stream_raw:  # one ctypes handle per stream, not one per launch
            self._stream, self._stream_raw = ctypes.c_void_p(raw), raw
        self.x.value, self.n.value, self.max_known.value = address, elements, first
        if first:
            absmax(blocks, 0, self._stream)
        one_pass(blocks, self._shared, self._stream)


_CACHE: Dict[int, Optional[HistogramKernels]] = {}
_LOCK = threading.Lock()


def readable_address(x: torch.Tensor) -> Optional[int]:
    """The address the kernels read this batch at in place, or None where they cannot (the torch ops take it):
    float32/16 or bfloat16, contiguous, 16-byte aligned."""
    if x.dtype not in KIND_OF or not x.is_contiguous():
        return None
    address = x.data_ptr()
    return address if address % 16 == 0 else None


def kernels_for(device: torch.device) -> Optional[HistogramKernels]:
    """The compiled kernels for a CUDA device, or None where NVRTC is unavailable (logged once).

    Callers check the rest: float32/16 or bfloat16 data, a power-of-two number of bins up to
    MAX_BINS, and a CUDA (not ROCm) build.
    """
    if torch.version.hip:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if index not in _CACHE:
            try:
                _CACHE[index] = HistogramKernels(torch.device("cuda", index))
            except Exception as error:  # no NVRTC, old PyTorch, unsupported GPU: keep the torch ops
                _LOG.warning("fused statistics kernels unavailable on cuda:%d (%s); using torch ops", index, error)
                _CACHE[index] = None
        return _CACHE[index]
