"""The host side of the statistics kernels' launch (quantlab.kernels.histogram_cuda.FusedHistogram, and
_DeviceAccumulator's straight path to it), on the CPU: the driver call is recorded, not made. What the
kernels compute is checked on the GPU (test_statistics_cuda.py)."""
import ctypes

import pytest
import torch

from quantlab import statistics
from quantlab.kernels import histogram_cuda


ABSMAX_F32, PASS_F32, PASS_F16 = 100, 103, 104  # the fake handles below


class FakeKernels:
    """What FusedHistogram needs of a device's compiled kernels: function handles and a block count."""

    functions = {f"ql_{name}_{suffix}": ctypes.c_void_p(100 + i) for i, (name, suffix) in
                 enumerate((n, s) for n in ("absmax", "pass") for s in ("f32", "f16", "bf16"))}

    def blocks_for(self, elements, per_vector):
        return 1 + elements // (1000 * per_vector)


@pytest.fixture
def launches(monkeypatch):
    """Each cuLaunchKernel call as (kernel, blocks, shared bytes, stream, x address, n, max_known)."""
    made = []

    def launch(func, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        assert (gy, gz, bx, by, bz, extra) == (1, 1, histogram_cuda._THREADS, 1, 1, None)
        # params: pointers to the kernel's arguments: x and n first; the pass kernels end with max_known
        x = ctypes.cast(params[0], ctypes.POINTER(ctypes.c_void_p)).contents.value
        n = ctypes.cast(params[1], ctypes.POINTER(ctypes.c_int)).contents.value
        counting = func.value >= PASS_F32
        max_known = ctypes.cast(params[12], ctypes.POINTER(ctypes.c_int)).contents.value if counting else None
        made.append((func.value, gx, shared, stream.value, x, n, max_known))
        return 0

    monkeypatch.setattr(histogram_cuda, "_launch_fn", lambda: launch)
    monkeypatch.setattr(histogram_cuda, "current_index", lambda: -1)  # a CPU tensor's get_device()
    streams = iter([7, 7, 9, 9, 9, 9, 9, 9])  # one per batch
    monkeypatch.setattr(histogram_cuda, "_stream_of", lambda index: next(streams))
    return made


def accumulator(x):
    acc = statistics._DeviceAccumulator(2048, x)
    acc._kernels = histogram_cuda.FusedHistogram(FakeKernels(), acc.amax, acc.exponent, acc.counts, acc.size_log2,
                                                 statistics._MIN_EXPONENT, statistics._MAX_EXPONENT)
    return acc


def test_a_batch_goes_straight_to_one_launch_and_a_first_batch_to_two(launches, monkeypatch):
    monkeypatch.setattr(statistics, "COPY_SHARED_INPUTS", False)
    x, y, h = torch.randn(64, 100), torch.randn(8000), torch.randn(5000).half()
    acc = accumulator(x)
    acc.update(x)
    acc.update(y, 8000)
    acc.update(h)
    absmax_f32, pass_f32, pass_f16 = ABSMAX_F32, PASS_F32, PASS_F16
    shared = 4 * acc.size
    assert launches == [
        (absmax_f32, 2, 0, 7, x.data_ptr(), 6400, None),  # the first batch: its max first ...
        (pass_f32, 2, shared, 7, x.data_ptr(), 6400, 1),  # ... then counted with the max known
        (pass_f32, 3, shared, 7, y.data_ptr(), 8000, 0),  # same stream: same handle
        (pass_f16, 1, shared, 9, h.data_ptr(), 5000, 0),  # another stream: a new handle
    ]
    assert (acc.batches, acc.elements) == (3, 6400 + 8000 + 5000)
    acc.reset()
    acc.update(y)
    assert [launch[0] for launch in launches[4:]] == [absmax_f32, pass_f32]  # emptied: a first batch again


def test_what_the_kernel_cannot_read_takes_the_torch_ops_and_another_device_switches_to_it(launches, monkeypatch):
    monkeypatch.setattr(statistics, "COPY_SHARED_INPUTS", False)
    x = torch.randn(32, 16)
    acc = accumulator(x)
    acc.update(x)
    before = len(launches)
    odd = torch.randn(16, 32).t()  # not contiguous
    acc.update(odd)
    assert len(launches) == before and acc.batches == 2 and float(acc.amax) == float(odd.abs().max())  # the fake counted nothing
    switched = []
    monkeypatch.setattr(histogram_cuda, "current_index", lambda: 3)  # another current device than the data's
    monkeypatch.setattr(histogram_cuda.FusedHistogram, "update",
                        lambda self, x, first, elements=None: switched.append((x.data_ptr(), first, elements)))
    acc.update(x)
    assert switched == [(x.data_ptr(), False, x.numel())] and len(launches) == before
