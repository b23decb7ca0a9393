"""A pass whose end stays on the device (collect(..., defer=True), what run_ptq does): the calibrators'
block forms are enqueued behind it and one read-back serves the statistics and every choice. The
ranges and statistics must equal those of the pass read back at its end, bit for bit (CPU, the
device path forced; test_ptq_cuda.py runs it on a GPU)."""
import functools
import math

import pytest
import torch
from torch import nn

import quantlab as ql
import quantlab.tensor_quantizer as tensor_quantizer
from quantlab.errors import NonFiniteActivationError
from quantlab.pipeline import choose_all, collect
from quantlab.ptq import run_ptq
from quantlab.statistics import HistogramCollector

from tests.calibrators.test_many import _kernel_flow_by_torch_ops, _mse_kernel_by_torch_ops  # noqa: E402

NAMES = ["max", "percentile", "entropy", "mse"]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 16, 16, generator=g) * s for s in (1.0, 3.0, 0.5, 7.0)]


@pytest.fixture
def device_path(monkeypatch):
    """Every collector on the device path (as on a GPU), here on the CPU."""
    monkeypatch.setattr(tensor_quantizer, "HistogramCollector", functools.partial(HistogramCollector, sync_free=True))


@pytest.fixture(params=["torch ops", "kernel flows"])
def flows(request, monkeypatch):
    if request.param == "kernel flows":  # nothing read back before the one read-back
        _kernel_flow_by_torch_ops(monkeypatch)
        _mse_kernel_by_torch_ops(monkeypatch)
    return request.param


def scales_of(result):
    return {name: (s.as_dict(), {k: (v.amax, v.bin_width, v.counts.tolist()) for k, v in s.statistics.items()})
            for name, s in result.scales.items()}


def reference():
    """The same run with the host path (read back per batch): no device state to defer."""
    model = cnn()
    ql.quantize(model, ql.int8_config())
    return scales_of(run_ptq(model, batches(), NAMES))


def test_run_ptq_deferred_equals_the_pass_read_back_at_its_end(device_path, flows):
    model = cnn()
    ql.quantize(model, ql.int8_config())
    got = scales_of(run_ptq(model, batches(), NAMES))
    assert got == reference()
    assert all(v[0] for v in got.values())


def test_the_deferred_pass_reads_nothing_back_until_choose(device_path, flows, monkeypatch):
    model = cnn()
    ql.quantize(model, ql.int8_config())
    reads = []
    original = HistogramCollector.flush
    def spy(self, *args, **kwargs):
        if self._device is not None:  # a read-back of pending batches
            reads.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HistogramCollector, "flush", spy)
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    assert statistics.pending is not None and reads == []
    assert statistics.batches == {"0": 4, "2": 4, "5": 4}
    chosen = choose_all(statistics, NAMES)
    assert statistics.pending is None and sorted(reads) == ["0", "2", "5"]
    assert list(chosen) == NAMES and all(list(r.inputs) == ["0", "2", "5"] for r in chosen.values())


def test_reading_the_histograms_completes_a_deferred_pass(device_path):
    model = cnn()
    ql.quantize(model, ql.int8_config())
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    histograms = statistics.histograms  # no choose: read back here
    assert statistics.pending is None and sorted(histograms) == ["0", "2", "5"]
    assert all(h is not None and h.counts.dtype == torch.int64 for h in histograms.values())
    again = choose_all(statistics, ["entropy"])["entropy"].inputs  # the ordinary path from here on
    assert sorted(again) == ["0", "2", "5"]


def test_a_collector_read_before_choose_is_not_flushed_twice(device_path):
    model = cnn()
    ql.quantize(model, ql.int8_config())
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    early = ql.iter_quantizers(model)
    first = next(r for r in early if r.role == "input" and r.module_name == "2")
    before = first.quantizer.collector.stats()  # reads that one back on its own
    chosen = choose_all(statistics, NAMES)
    after = statistics.histograms["2"]
    assert (after.amax, after.bin_width, after.counts.tolist()) == (before.amax, before.bin_width, before.counts.tolist())
    assert first.quantizer.collector.num_batches == 4
    assert chosen["max"].inputs["2"] == float(before.amax)


def test_a_non_finite_activation_is_reported_by_the_read_back(device_path):
    model = cnn()
    data = batches()
    data[2][0, 0, 0, 0] = float("nan")
    ql.quantize(model, ql.int8_config())
    with pytest.raises(NonFiniteActivationError, match="'0'"):
        run_ptq(model, data, NAMES)


def test_a_layer_with_other_bins_reads_back_at_the_end_as_before(device_path):
    model = cnn()
    ql.quantize(model, ql.int8_config())
    for ref in ql.iter_quantizers(model):
        if ref.role == "input" and ref.module_name == "2":
            ref.quantizer.num_bins = 1024
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    assert statistics.pending is None  # states of different sizes: flushed at the end of the pass
    assert sorted(statistics.histograms) == ["0", "2", "5"]


def test_light_ranges_are_in_before_the_costly_ones_are_read(device_path, monkeypatch):
    _kernel_flow_by_torch_ops(monkeypatch)
    _mse_kernel_by_torch_ops(monkeypatch)
    model = cnn()
    ql.quantize(model, ql.int8_config())
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    chosen = choose_all(statistics, ["entropy", "max", "mse", "percentile"])
    assert chosen.ready == ["max", "percentile"]  # entropy and mse: read back when first asked for
    assert list(chosen) == ["entropy", "max", "mse", "percentile"]
    assert chosen["entropy"].calibrator == "entropy" and chosen.ready == ["entropy", "max", "mse", "percentile"]


@pytest.mark.parametrize("names", [["entropy", "max", "mse", "percentile"], ["max", "percentile", "entropy", "mse"]])
def test_the_model_is_left_with_the_last_calibrator_wanted(device_path, names):
    """Ranges already in are applied first (the host works while the device computes the rest), but the
    scales keep the order wanted and the model ends with the last calibrator's ranges."""
    model = cnn()
    ql.quantize(model, ql.int8_config())
    result = run_ptq(model, batches(), names)
    assert list(result.scales) == names and list(result.calibrate_seconds) == names
    last = result.scales[names[-1]]
    for ref in ql.iter_quantizers(model):
        held = ref.quantizer.amax
        want = last.get(ref.module_name, ref.role).amax
        assert (held.tolist() if held.dim() else float(held)) == want, (ref.module_name, ref.role)
    reference_model = cnn()
    ql.quantize(reference_model, ql.int8_config())
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(tensor_quantizer, "HistogramCollector", HistogramCollector)  # the host path
    try:
        want = scales_of(run_ptq(reference_model, batches(), names))
    finally:
        monkeypatch.undo()
    assert scales_of(result) == want


def test_a_non_finite_weight_read_back_with_the_statistics_is_reported(device_path):
    from quantlab.errors import CalibrationError

    model = cnn()
    ql.quantize(model, ql.int8_config())
    with torch.no_grad():  # the last layer: its output feeds no quantized layer, so the pass itself is fine
        model[5].parametrizations.weight.original[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="weights of '5' contain NaN or Inf"):
        run_ptq(model, batches(), NAMES)


def test_weight_ranges_read_back_are_split_and_checked_without_torch_cpu_ops(monkeypatch):
    """BERT-base reads back ~85k weight ranges at once: the finiteness check must not be a torch CPU op (one that
    size runs on the intra-op thread pool, 23-31 ms to wake on an H200 host), and must still find each bad one."""
    from types import SimpleNamespace

    from quantlab.pipeline.apply import split_amax_values

    quantizers = [SimpleNamespace(amax=torch.zeros(n)) for n in (3072, 40000, 768)] + [SimpleNamespace(amax=torch.zeros(()))]
    flat = torch.rand(3072 + 40000 + 768 + 1) + 0.5
    flat[3072 + 39000] = float("nan")
    flat[-1] = float("-inf")

    def no_torch_cpu_op(*args, **kwargs):
        raise AssertionError("a torch CPU op on the read-back")

    monkeypatch.setattr(torch, "isfinite", no_torch_cpu_op)
    values, finite = split_amax_values(quantizers, flat)
    assert finite == [True, False, True, False]
    assert [len(v) for v in values[:3]] == [3072, 40000, 768] and math.isinf(values[3])
    assert values[0] == flat[:3072].tolist() and values[2] == flat[43072:43840].tolist()
    values, finite = split_amax_values(quantizers[:1] + quantizers[2:3], torch.ones(3840))
    assert finite == [True, True] and values[1] == [1.0] * 768


def test_a_non_finite_activation_is_raised_again_on_every_later_read(device_path):
    model = cnn()
    data = batches()
    data[1][0, 0, 0, 0] = float("nan")
    ql.quantize(model, ql.int8_config())
    statistics = collect(model, lambda m: [m(x) for x in data], defer=True)
    for _ in range(2):  # the failing tensor's statistics are gone: never a silent 0.0 range instead
        with pytest.raises(NonFiniteActivationError, match="'0'"):
            choose_all(statistics, ["max"])
    with pytest.raises(NonFiniteActivationError, match="'0'"):
        statistics.histograms  # noqa: B018


class ZeroedInput(nn.Module):
    """A linear layer whose input is always zero: its statistics are None."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.second(self.first(x) * 0.0)


def test_a_calibrator_without_a_block_form_never_sees_a_tensor_without_statistics(device_path, monkeypatch):
    from quantlab.calibrators import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    # Fails on a histogram without bins, as a user's calibrator may: it must never be handed one.
    base.register_calibrator("first-peak")(lambda stats, *, num_bits=8: (int(stats.counts.argmax()) + 1) * stats.bin_width)
    data = [torch.randn(5, 6, generator=torch.Generator().manual_seed(k)) for k in range(3)]

    def run(sync_free):
        model = ZeroedInput()
        ql.quantize(model, ql.int8_config())
        monkeypatch.setattr(tensor_quantizer, "HistogramCollector", functools.partial(HistogramCollector, sync_free=sync_free))
        with pytest.warns(UserWarning, match="saw only zeros"):
            return scales_of(run_ptq(model, data, ["first-peak", "entropy"]))

    assert run(True) == run(False)


def test_extra_tensors_from_another_device_are_not_read_with_the_statistics(device_path):
    from quantlab.pipeline.choose import ChoicesBehindThePass

    model = cnn()
    ql.quantize(model, ql.int8_config())
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    chosen = ChoicesBehindThePass(statistics, {"max": {}}, [torch.ones(2), torch.empty(3, device="meta")])
    assert chosen.extra_values is None and chosen["max"].inputs  # the caller reads those itself
    statistics = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    chosen = ChoicesBehindThePass(statistics, {"max": {}}, [torch.ones(2), torch.full((2, 1), 3.0)])
    assert chosen.extra_values.tolist() == [1.0, 1.0, 3.0, 3.0]


def test_num_bits_as_a_calibrator_parameter_is_rejected_as_on_the_ordinary_path(device_path):
    model = cnn()
    ql.quantize(model, ql.int8_config())
    deferred = collect(model, lambda m: [m(x) for x in batches()], defer=True)
    with pytest.raises(TypeError, match="num_bits") as got:
        choose_all(deferred, {"entropy": {"num_bits": 4}})
    ordinary = collect(model, lambda m: [m(x) for x in batches()])
    with pytest.raises(TypeError, match="num_bits") as want:
        choose_all(ordinary, {"entropy": {"num_bits": 4}})
    assert str(got.value) == str(want.value)

