"""One-pass statistics: order independence, growth, merging, NaN detection."""
import itertools

import pytest
import torch

from quantlab.errors import NonFiniteActivationError
from quantlab.statistics import HistogramCollector, bin_width_for


def collect(batches, num_bins=2048):
    c = HistogramCollector(num_bins, name="layer")
    for b in batches:
        c.update(b)
    return c


def reference_counts(values, width, nbins):
    """Right-closed bins of |x|: (k*w, (k+1)*w], zeros in bin 0."""
    counts = torch.zeros(nbins, dtype=torch.int64)
    for v in values.abs().flatten().tolist():
        k = max(int(-(-v // width)) - 1, 0)  # ceil(v / w) - 1
        counts[k] += 1
    return counts


def test_counts_match_plain_reference():
    x = torch.randn(3000) * 2
    c = collect([x], num_bins=128)
    stats = c.stats()
    assert stats.bin_width == bin_width_for(x.abs().max().item(), 128)
    assert torch.equal(stats.counts, reference_counts(x, stats.bin_width, stats.num_bins))
    assert stats.amax == x.abs().max().item()


def test_bin_count_between_num_bins_and_twice():
    for scale in [1e-3, 0.7, 1.0, 3.0, 1e4]:
        c = collect([torch.randn(500) * scale], num_bins=256)
        assert 256 <= c.stats().num_bins <= 512


def test_any_batch_order_gives_same_counts_as_one_histogram():
    batches = [torch.randn(257) * s for s in (0.1, 1.0, 5.0, 0.5, 40.0)]
    whole = collect([torch.cat(batches)]).stats()
    for order in itertools.permutations(range(len(batches))):
        stats = collect([batches[i] for i in order]).stats()
        assert stats.bin_width == whole.bin_width
        assert torch.equal(stats.counts, whole.counts), order


def test_merge_of_shards_equals_one_pass():
    batches = [torch.randn(100, 8) * (i + 1) for i in range(6)]
    whole = collect(batches).stats()
    a, b = collect(batches[::2]), collect(batches[1::2])
    merged = a.merge_(b).stats()
    assert merged.bin_width == whole.bin_width and torch.equal(merged.counts, whole.counts)
    assert merged.amax == whole.amax


def test_growth_merges_pairs_and_memory_is_bounded():
    c = collect([torch.rand(1000) * 1e-3] + [torch.rand(1000) * 10.0 ** k for k in range(6)], num_bins=128)
    assert c.stats().num_bins <= 256
    assert c.num_elements == 7000


def test_memory_does_not_grow_with_samples():
    c = HistogramCollector(2048)
    sizes = set()
    for _ in range(50):
        c.update(torch.randn(64, 16) * 3)
        sizes.add(c.counts.numel())
    assert max(sizes) <= 4096


def test_leading_zero_batches_are_counted_in_bin_zero():
    c = collect([torch.zeros(10), torch.zeros(5), torch.tensor([1.0, -2.0])], num_bins=128)
    stats = c.stats()
    assert stats.counts[0] == 15 and int(stats.counts.sum()) == 17
    assert collect([torch.zeros(3)]).stats() is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activation_names_the_module(bad):
    c = HistogramCollector(128, name="encoder.layer.3.output.dense")
    c.update(torch.ones(3))
    x = torch.ones(4)
    x[2] = bad
    with pytest.raises(NonFiniteActivationError, match=r"encoder\.layer\.3\.output\.dense.*batch 1"):
        c.update(x)


def test_half_precision_input_is_binned_exactly():
    x = torch.randn(4000)
    assert torch.equal(collect([x.half()]).stats().counts, collect([x.half().float()]).stats().counts)


# -- the sync-free device path (the CUDA default) must give the host path's counts bit for bit --------
DEVICE_PATH_CASES = {
    "gaussian": [torch.randn(3000) * 2],
    "leading zeros": [torch.zeros(10), torch.zeros(5), torch.tensor([1.0, -2.0])],
    "range grows 10^9": [torch.rand(1000) * 1e-3] + [torch.rand(1000) * 10.0 ** k for k in range(6)],
    "post-ReLU, shrinking and growing": [torch.relu(torch.randn(16, 8, 9, 9)) * s for s in (0.1, 3.0, 0.5, 100.0)],
    "values on bin edges": [torch.arange(0, 64.0).reshape(8, 8), torch.arange(0, 1024.0) * 0.25],
    "half precision": [torch.randn(257).half() * s for s in (0.1, 1.0, 5.0)],
    "double precision": [torch.randn(257).double() * s for s in (0.1, 1.0, 5.0)],
    "only zeros": [torch.zeros(7), torch.zeros(2, 3)],
}


def collect_with(batches, sync_free, num_bins=2048):
    c = HistogramCollector(num_bins, name="layer", sync_free=sync_free)
    for b in batches:
        c.update(b)
    return c


@pytest.mark.parametrize("num_bins", [128, 2048])
@pytest.mark.parametrize("case", sorted(DEVICE_PATH_CASES))
def test_device_path_counts_equal_host_path(case, num_bins):
    batches = DEVICE_PATH_CASES[case]
    host, device = collect_with(batches, False, num_bins), collect_with(batches, True, num_bins)
    assert device.num_batches == host.num_batches == len(batches)
    assert device.num_elements == host.num_elements == sum(b.numel() for b in batches)
    hs, ds = host.stats(), device.stats()
    if hs is None:
        assert ds is None
        return
    assert (ds.bin_width, ds.amax) == (hs.bin_width, hs.amax)
    assert torch.equal(ds.counts, hs.counts)


def test_device_and_host_batches_mix_and_merge():
    batches = DEVICE_PATH_CASES["post-ReLU, shrinking and growing"]
    mixed = HistogramCollector(2048, sync_free=True)
    mixed.update(batches[0])
    mixed.sync_free = False
    mixed.update(batches[1])
    mixed.sync_free = True
    other = collect_with(batches[2:], True)
    mixed.merge_(other)
    whole = collect_with(batches, False).stats()
    assert torch.equal(mixed.stats().counts, whole.counts) and mixed.num_batches == 4


def test_device_path_reports_non_finite_when_read():
    c = HistogramCollector(128, name="blocks.2.mlp", sync_free=True)
    c.update(torch.ones(3))
    c.update(torch.tensor([1.0, float("nan")]))  # no read-back here: nothing raised yet
    c.update(torch.tensor([float("inf")]))
    with pytest.raises(NonFiniteActivationError, match=r"blocks\.2\.mlp.*batches 0-2"):
        c.stats()


# -- the C counting loop of the host path (quantlab.kernels.histogram_cpu) vs the torch ops ------------
@pytest.mark.parametrize("num_bins", [128, 2048])
@pytest.mark.parametrize("case", sorted(DEVICE_PATH_CASES))
def test_cpu_counting_loop_equals_torch_ops(case, num_bins, monkeypatch):
    from quantlab import statistics
    from quantlab.kernels import histogram_cpu

    assert histogram_cpu.count_function() is not None, "the C loop did not build (is a C compiler installed?)"
    batches = DEVICE_PATH_CASES[case] + [torch.relu(torch.randn(3, 70_001)) * 7]  # large: split over threads
    fused = collect_with(batches, False, num_bins)
    monkeypatch.setattr(statistics, "FUSED_KERNELS", False)
    ops = collect_with(batches, False, num_bins)
    fs, os_ = fused.stats(), ops.stats()
    assert (fs.bin_width, fs.amax) == (os_.bin_width, os_.amax)
    assert torch.equal(fs.counts, os_.counts)
    assert fused.num_elements == ops.num_elements == sum(b.numel() for b in batches)


def test_cpu_counting_loop_reports_non_finite():
    c = HistogramCollector(2048, name="head.fc")
    c.update(torch.ones(10))
    with pytest.raises(NonFiniteActivationError, match=r"head\.fc.*batch 1"):
        c.update(torch.tensor([1.0, -float("inf")]))


def test_cpu_counting_loop_leaves_counts_untouched_on_nan():
    c = HistogramCollector(2048, name="blocks.0")
    c.update(torch.rand(1000))
    before = c.stats().counts.clone()
    with pytest.raises(NonFiniteActivationError, match=r"blocks\.0.*batch 1"):
        c.update(torch.tensor([0.5, float("nan"), 0.25] * 100))
    assert torch.equal(c.stats().counts, before) and c.num_batches == 1


def test_cpu_counting_loop_on_loaded_statistics_with_more_bins(monkeypatch):
    """Statistics loaded with more than 2 * num_bins bins: the range must widen as on the torch path."""
    from quantlab import statistics
    from quantlab.calibrators import HistogramStats

    def run():
        c = HistogramCollector.from_stats(HistogramStats(counts=torch.ones(100, dtype=torch.int64), bin_width=1 / 16, amax=6.2), num_bins=16)
        c.update(torch.tensor([5.0, 0.1, 1.5]))  # inside the loaded 100 bins, beyond 2 * 16 of them
        return c.stats()

    fused = run()
    monkeypatch.setattr(statistics, "FUSED_KERNELS", False)
    ops = run()
    assert (fused.bin_width, fused.amax) == (ops.bin_width, ops.amax) and torch.equal(fused.counts, ops.counts)


def test_flush_all_reads_back_once_and_equals_flushing_one_by_one():
    from quantlab.statistics import flush_all

    g = torch.Generator().manual_seed(5)
    batches = [[torch.randn(300, generator=g) * (k + 1) for _ in range(3)] for k in range(4)]
    batches[2][1] = torch.zeros(50)  # a tensor that also saw only zeros in one batch

    def collectors(num_bins):
        sizes = num_bins if isinstance(num_bins, list) else [num_bins] * 4
        made = [HistogramCollector(n, name=f"layer{k}", sync_free=True) for k, n in enumerate(sizes)]
        for c, xs in zip(made, batches):
            for x in xs:
                c.update(x)
        return made

    # A power of two, not one (float64 state), and bins differing between tensors (read one by one).
    for num_bins in (128, 96, [128, 64, 128, 256]):
        together, alone = collectors(num_bins), collectors(num_bins)
        flush_all(together + [HistogramCollector(128)])  # an empty one is skipped
        for a, b in zip(together, alone):
            b.flush()
            assert a._device is None and (a._amax, a._bin_width, a._num_batches) == (b._amax, b._bin_width, b._num_batches)
            assert torch.equal(a._counts, b._counts)
    made = collectors(128)
    made[2].update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteActivationError, match="'layer2'"):
        flush_all(made)
    assert made[0]._device is None and made[1]._device is None and made[3]._device is not None


# -- deep copies (a model calibrated on a GPU is copied, e.g. by compare or the 2:4 speed runner) --------
class _KernelHandle:
    """Stands in for the fused CUDA kernels' launcher on the CPU: it holds ctypes pointers, as
    quantlab.kernels.histogram_cuda.FusedHistogram does, so copy.deepcopy refuses it."""

    def __init__(self):
        import ctypes

        self.pointer = ctypes.c_void_p(1)


def test_deepcopy_of_a_collector_with_pending_device_batches_skips_the_kernel_handle():
    import copy

    from quantlab.statistics import _DeviceAccumulator

    batches = DEVICE_PATH_CASES["post-ReLU, shrinking and growing"]
    c = collect_with(batches[:2], sync_free=True)
    c._device._kernels = _KernelHandle()  # what a collector fed on CUDA holds
    c._spare = _DeviceAccumulator(2048, batches[0])
    c._spare._kernels = _KernelHandle()
    with pytest.raises(ValueError, match="ctypes"):
        copy.deepcopy(c._device.__dict__)  # the handle itself cannot be copied
    clone = copy.deepcopy(c)
    assert clone._device is not None and clone._device._kernels is None  # rebuilt for its own tensors (none on the CPU)
    assert clone._spare is None and clone._device.counts is not c._device.counts
    assert clone.num_batches == c.num_batches == 2  # still pending in both: nothing was read back
    for batch in batches[2:]:
        clone.update(batch)
    whole, first_two = collect_with(batches, False).stats(), collect_with(batches[:2], False).stats()
    assert torch.equal(clone.stats().counts, whole.counts) and clone.stats().amax == whole.amax
    c._device._kernels = None  # the original's own state, untouched by the copy
    assert torch.equal(c.stats().counts, first_two.counts) and c.num_batches == 2


def test_deepcopy_keeps_a_pending_non_finite_value_pending_in_both():
    import copy

    c = HistogramCollector(128, name="blocks.0", sync_free=True)
    c.update(torch.tensor([1.0, float("nan")]))
    clone = copy.deepcopy(c)
    for each in (clone, c):
        with pytest.raises(NonFiniteActivationError, match=r"blocks\.0"):
            each.stats()
