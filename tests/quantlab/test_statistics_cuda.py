"""The fused CUDA statistics kernels against the host path (runs only where CUDA is available).

CI has no GPU, so these run on the GPU machine (benchmarks/RESULTS.md records the run); the same
cases without the kernels run everywhere in test_statistics.py.
"""
import functools

import pytest
import torch

from quantlab import statistics
from quantlab.errors import NonFiniteActivationError
from quantlab.kernels import histogram_cuda
from quantlab.statistics import HistogramCollector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cases():
    g = torch.Generator().manual_seed(7)
    return {
        "post-ReLU, growing and shrinking range": [torch.relu(torch.randn(16, 64, 28, 28, generator=g)) * s for s in (0.5, 9.0, 1.0, 300.0)],
        "range grows 10^9": [torch.rand(4099, generator=g) * 1e-3] + [torch.rand(1000, generator=g) * 10.0 ** k for k in range(6)],
        "values on bin edges": [torch.arange(0, 64.0), torch.arange(0, 4096.0) * 0.25, torch.arange(0, 33.0) * 2.0 ** -20],
        "leading zeros, odd sizes (vector tail)": [torch.zeros(13), torch.zeros(5), torch.randn(1031, generator=g)],
        "subnormals beside normal values": [torch.tensor([1e-40, -3e-39, 0.0, 2.0]), torch.rand(999, generator=g)],
        "tiny values": [torch.rand(999, generator=g) * 1e-30, torch.rand(999, generator=g) * 1e-25],
        "heavy tail": [torch.randn(100_000, generator=g) ** 5],
        "range jumps, list overflows (second read)": [torch.rand(5000, generator=g) * 1e-3, torch.randn(200_000, generator=g) * 50,
                                                       torch.randn(300_000, generator=g) * 1e4, torch.randn(9, generator=g) * 1e6],
        "first batch all zeros, then values": [torch.zeros(4096), torch.randn(10_000, generator=g) * 1e-20, torch.randn(100, generator=g)],
        "float16": [torch.randn(4097, generator=g).half() * s for s in (0.1, 3.0, 60000.0 / 6)],
        "bfloat16": [torch.randn(4097, generator=g).bfloat16() * s for s in (0.1, 3.0, 1e30)],
        "all three dtypes in turn": [torch.randn(777, generator=g) * 2, torch.randn(778, generator=g).half(), torch.randn(779, generator=g).bfloat16() * 5],
    }


@pytest.fixture(scope="module")
def kernels():
    compiled = histogram_cuda.kernels_for(torch.device("cuda"))
    assert compiled is not None, "NVRTC compilation failed (see the log)"
    return compiled


def collect(batches, sync_free, device="cpu", num_bins=2048):
    c = HistogramCollector(num_bins, name="layer", sync_free=sync_free)
    for b in batches:
        c.update(b.to(device))
    return c


@pytest.mark.parametrize("case", sorted(cases()))
def test_fused_kernels_equal_host_path(kernels, case):
    batches = cases()[case]
    host = collect(batches, sync_free=False)
    fused = collect(batches, sync_free=True, device="cuda")
    assert fused._device._kernels.kernels is kernels  # the fused path ran, not the torch ops
    assert fused.num_batches == host.num_batches and fused.num_elements == host.num_elements
    hs, fs = host.stats(), fused.stats()
    assert (fs.bin_width, fs.amax) == (hs.bin_width, hs.amax)
    assert torch.equal(fs.counts.cpu(), hs.counts)


@functools.lru_cache(maxsize=None)
def launch_setting(unroll, blocks_per_sm, min_elements, group_vote, load):
    return histogram_cuda.HistogramKernels(torch.device("cuda"), unroll=unroll, blocks_per_sm=blocks_per_sm,
                                           min_elements_per_block=min_elements, group_vote=group_vote, load=load)


@pytest.mark.parametrize("setting", [(1, 2, 1, False, 0), (2, 1, 1, True, 1), (4, 2, 2048, False, 0), (4, 2, 2048, True, 0),
                                     (8, 1, 1 << 18, True, 2), (3, 4, 5000, True, 1)])
@pytest.mark.parametrize("case", ["post-ReLU, growing and shrinking range", "leading zeros, odd sizes (vector tail)",
                                  "range jumps, list overflows (second read)", "float16", "bfloat16"])
def test_every_launch_setting_counts_the_same(monkeypatch, case, setting):
    # Loads in flight, block counts, how the warp votes on values above the range and the load
    # instruction change which thread counts which value (and the unrolled loop's remainder),
    # never the counts.
    kernels = launch_setting(*setting)
    index = torch.cuda.current_device()
    monkeypatch.setitem(histogram_cuda._CACHE, index, kernels)
    batches = cases()[case]
    fused = collect(batches, sync_free=True, device="cuda")
    assert fused._device._kernels.kernels is kernels
    host = collect(batches, sync_free=False)
    hs, fs = host.stats(), fused.stats()
    assert (fs.bin_width, fs.amax) == (hs.bin_width, hs.amax)
    assert torch.equal(fs.counts.cpu(), hs.counts)


def test_fused_kernels_equal_torch_ops_on_large_activation(kernels, monkeypatch):
    x = torch.relu(torch.randn(64, 256, 56, 56, device="cuda")) * 3
    fused = collect([x, x * 0.5, x * 4], sync_free=True, device="cuda")
    monkeypatch.setattr(statistics, "FUSED_KERNELS", False)
    ops = collect([x, x * 0.5, x * 4], sync_free=True, device="cuda")
    assert ops._device._kernels is None
    fs, os_ = fused.stats(), ops.stats()
    assert (fs.bin_width, fs.amax) == (os_.bin_width, os_.amax) and torch.equal(fs.counts, os_.counts)


def test_non_contiguous_batch_takes_torch_ops_with_same_counts(kernels):
    x = torch.randn(64, 96, device="cuda")
    host = collect([x.t().cpu(), x[:, ::2].cpu()], sync_free=False)
    mixed = collect([x.t(), x[:, ::2]], sync_free=True, device="cuda")
    assert torch.equal(mixed.stats().counts.cpu(), host.stats().counts)


def test_fused_update_does_not_synchronize(kernels):
    c = HistogramCollector(2048, sync_free=True)
    batches = [torch.randn(8, 1000, device="cuda") * s for s in (1, 10, 0.1)]
    c.update(batches[0])  # creates the state (allocations may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            c.update(b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert c.num_batches == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fused_path_reports_non_finite(kernels, bad):
    c = HistogramCollector(2048, name="encoder.layer.3", sync_free=True)
    c.update(torch.ones(40, device="cuda"))
    c.update(torch.tensor([1.0] * 31 + [bad], device="cuda"))
    c.update(torch.ones(8, device="cuda"))
    with pytest.raises(NonFiniteActivationError, match=r"encoder\.layer\.3.*batches 0-2"):
        c.stats()


def test_fused_kernels_capture_in_a_cuda_graph(kernels):
    static = torch.randn(4096, device="cuda") * 0.01  # replays grow the range: list and re-binning
    c = HistogramCollector(2048, sync_free=True)
    c.update(static)  # state exists before capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    accumulator = c._device
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        accumulator.update(static)  # recorded, not run: the host-side counters must not move
    accumulator.batches -= 1
    accumulator.elements -= static.numel()
    torch.cuda.current_stream().wait_stream(side)
    reference = HistogramCollector(2048, sync_free=False)
    reference.update(static.cpu())
    for scale in (2.0, 0.25, 40.0, 1e6):
        static.copy_(torch.randn(4096, device="cuda") * scale)
        graph.replay()
        accumulator.batches += 1
        accumulator.elements += static.numel()
        reference.update(static.cpu())
    assert torch.equal(c.stats().counts.cpu(), reference.stats().counts)


# -- the statistics pass replayed as CUDA graphs (quantlab.cuda_graphs) --------------------------------
class _Net(torch.nn.Module):
    def __init__(self, sync_in_forward=False):
        super().__init__()
        self.sync_in_forward = sync_in_forward
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.conv(y)) + y
        if self.sync_in_forward and float(y.max()) < 0:  # a host read: not capturable
            y = -y
        return {"logits": self.head(y.mean(dim=(2, 3)))}


def _graph_case(sync_in_forward=False):
    import copy

    import quantlab

    torch.manual_seed(0)
    model = _Net(sync_in_forward).cuda().eval()
    quantlab.quantize(model, quantlab.int8_config())
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randn(16, 3, 12, 12, device="cuda", generator=g) * (1 + i) for i in range(6)]
    batches.append(torch.randn(7, 3, 12, 12, device="cuda", generator=g))
    return model, copy.deepcopy(model), batches


def _stats(model):
    from quantlab.api import collected_statistics

    return {k: (s.amax, s.bin_width, s.counts.cpu(), s.num_batches if hasattr(s, "num_batches") else None)
            for k, s in collected_statistics(model).items()}


def _assert_same_statistics(model, reference, layers=None):
    """Every input's max, bin width and counts equal between two models' passes (and how many inputs)."""
    ours, theirs = _stats(model), _stats(reference)
    assert ours.keys() == theirs.keys()
    if layers is not None:
        assert len(ours) == layers
    for name in ours:
        assert ours[name][:2] == theirs[name][:2], name
        assert torch.equal(ours[name][2], theirs[name][2]), name


def _shared_against_alone(model, forward_loop, monkeypatch, layers):
    """A pass with shared inputs copied (graphed where it can be) against every layer counting its own (eager)."""
    import copy

    import quantlab
    from quantlab import collect_statistics, statistics

    quantlab.quantize(model, quantlab.int8_config())
    alone = copy.deepcopy(model)
    monkeypatch.setattr(statistics, "COPY_SHARED_INPUTS", False)
    collect_statistics(alone, forward_loop, cuda_graphs=False)
    monkeypatch.setattr(statistics, "COPY_SHARED_INPUTS", True)
    counts = collect_statistics(model, forward_loop)
    _assert_same_statistics(model, alone, layers)
    return counts


@pytest.mark.parametrize("sync_in_forward", [False, True])
def test_graphed_statistics_pass_equals_eager(kernels, sync_in_forward):
    from quantlab import collect_statistics
    from quantlab.cuda_graphs import EAGER_CALLS, graphed_forward

    graphed_model, eager_model, batches = _graph_case(sync_in_forward)
    outputs = []
    with graphed_forward(graphed_model) as graphed:
        counts = collect_statistics(graphed_model, lambda m: [outputs.append(m(x)["logits"]) for x in batches], cuda_graphs=False)
    assert "forward" not in graphed_model.__dict__  # restored
    # 6 batches of 16: EAGER_CALLS eager, then captured (replayed at once) and replays; the odd last batch eager.
    assert graphed.replays == (0 if sync_in_forward else 6 - EAGER_CALLS)
    eager_outputs = []
    eager_counts = collect_statistics(eager_model, lambda m: [eager_outputs.append(m(x)["logits"]) for x in batches], cuda_graphs=False)
    assert counts == eager_counts and set(counts.values()) == {7}
    for a, b in zip(outputs, eager_outputs):  # replay outputs are copies, not the graph's buffers
        torch.testing.assert_close(a, b)
    _assert_same_statistics(graphed_model, eager_model)


def test_collect_statistics_uses_graphs_by_default(kernels):
    from quantlab import collect_statistics

    model, reference, batches = _graph_case()
    assert collect_statistics(model, lambda m: [m(x) for x in batches]) == collect_statistics(
        reference, lambda m: [m(x) for x in batches], cuda_graphs=False)
    for (name, ours), theirs in zip(_stats(model).items(), _stats(reference).values()):
        assert torch.equal(ours[2], theirs[2]), name


@pytest.mark.parametrize("long_pass", [False, True])
def test_graphs_only_for_passes_long_enough_to_repay_the_capture(kernels, long_pass):
    from quantlab import collect_statistics
    from quantlab.batching import forward_loop
    from quantlab.cuda_graphs import MIN_BATCHES, GraphedForward

    model, reference, batches = _graph_case()
    length = MIN_BATCHES if long_pass else MIN_BATCHES - 1
    batches = (batches[:6] * -(-MIN_BATCHES // 6))[:length]
    graphed = []

    class Probe:  # a sized batch source that looks at the model's forward while the pass runs
        def __len__(self):
            return len(batches)

        def __iter__(self):
            for x in batches:
                graphed.append(isinstance(model.__dict__.get("forward"), GraphedForward))
                yield x

    counts = collect_statistics(model, forward_loop(Probe()))
    assert set(graphed) == {long_pass}  # one batch short of MIN_BATCHES eager, MIN_BATCHES through graphs
    assert counts == collect_statistics(reference, forward_loop(batches), cuda_graphs=False)
    for (name, ours), theirs in zip(_stats(model).items(), _stats(reference).values()):
        assert torch.equal(ours[2], theirs[2]), name


def test_reading_statistics_mid_pass_retires_the_graphs(kernels):
    from quantlab import collect_statistics
    from quantlab.attach import iter_quantizers
    from quantlab.cuda_graphs import graphed_forward

    graphed_model, eager_model, batches = _graph_case()

    def loop(m):
        quantizer = next(r.quantizer for r in iter_quantizers(m) if r.role == "input")
        for i, x in enumerate(batches):
            m(x)
            if i == 3:
                assert quantizer.collector.amax > 0  # a read mid-pass folds the device state in
    with graphed_forward(graphed_model) as graphed:
        counts = collect_statistics(graphed_model, loop, cuda_graphs=False)
    assert graphed.replays >= 1
    assert counts == collect_statistics(eager_model, loop, cuda_graphs=False)
    for (name, ours), theirs in zip(_stats(graphed_model).items(), _stats(eager_model).values()):
        assert ours[:2] == theirs[:2] and torch.equal(ours[2], theirs[2]), name


def test_graphs_stay_off_with_foreign_hooks_or_several_devices(kernels):
    from quantlab.cuda_graphs import graphed_forward

    model, _, _ = _graph_case()
    handle = model.conv.register_forward_hook(lambda *a: None)
    with graphed_forward(model) as graphed:
        assert graphed is None
    handle.remove()
    with graphed_forward(model) as graphed:
        assert graphed is not None
    model.head.cpu()
    with graphed_forward(model) as graphed:
        assert graphed is None


def test_deepcopy_of_collectors_fed_on_cuda(kernels):
    import copy

    from torch import nn

    import quantlab as ql

    batches = cases()["post-ReLU, growing and shrinking range"]
    c = collect(batches[:2], True, device="cuda")
    assert c._device._kernels is not None  # the fused kernels' launcher: ctypes pointers into c's state
    clone = copy.deepcopy(c)
    assert clone._device._kernels is not None and clone._device._kernels is not c._device._kernels
    for x in batches[2:]:
        clone.update(x.cuda())  # through the copy's own launcher, into the copy's own tensors
    whole, first_two = collect(batches, False).stats(), collect(batches[:2], False).stats()
    assert torch.equal(clone.stats().counts.cpu(), whole.counts) and clone.stats().amax == whole.amax
    assert torch.equal(c.stats().counts.cpu(), first_two.counts) and c.num_batches == 2
    # A model calibrated on the GPU deep-copies (its collectors keep emptied device states for reuse).
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).cuda()
    x = torch.randn(16, 64, device="cuda")
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(x))
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))


@pytest.mark.parametrize("where", ["statistics pass", "qat.graphed", "sparse timing"])
def test_a_failed_capture_leaves_random_numbers_working(kernels, where):
    """A capture that fails (a host read inside it) must not leave the device's generator in capture mode:
    torch leaves it there when cudaStreamEndCapture fails, and every later eager randn/dropout raised."""
    from quantlab.qat.errors import QATError

    def host_read(x):
        return x * 2 if float(x.sum()) > -1e30 else x  # a sync: invalidates any capture

    if where == "statistics pass":
        from quantlab import collect_statistics

        model, _, batches = _graph_case(sync_in_forward=True)
        collect_statistics(model, lambda m: [m(x) for x in batches])  # tries a capture, stays eager
    elif where == "qat.graphed":
        from quantlab import qat

        class Syncing(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)

            def forward(self, x):
                return host_read(self.fc(x))

        model = Syncing().cuda().train()
        with pytest.raises(Exception) as failed:
            qat.graphed(model, torch.randn(4, 8, device="cuda"), warmup=1)
        assert not isinstance(failed.value, QATError)  # the capture itself failed
    else:
        from quantlab.runtimes.cusparselt.speed import time_call

        timing = time_call(lambda i: host_read(torch.ones(4, device="cuda")), device=torch.device("cuda"), calls=2, repeats=2)
        assert timing.how.startswith("eager (")  # the graph was tried and refused
    # torch.cuda.graph leaves its capture stream current when capture_end fails (graph_capture.state_kept_on_failure).
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    g = torch.Generator(device="cuda").manual_seed(3)
    torch.randn(8, device="cuda")  # raised "Offset increment outside graph capture" before
    torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5, training=True)
    assert torch.randn(4, device="cuda", generator=g).isfinite().all()


class _SharedInputs(torch.nn.Module):
    """A block input into two convolutions and a pooled tensor into three linears."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.q, self.k, self.v = (torch.nn.Linear(16, 10) for _ in range(3))

    def forward(self, x):
        y = torch.relu(self.stem(x))
        p = torch.relu(self.a(y) + self.b(y)).mean(dim=(2, 3))
        return self.q(p) + self.k(p) * self.v(p)


def test_graphed_pass_with_shared_inputs_equals_every_layer_counted_alone(kernels, monkeypatch):
    torch.manual_seed(0)
    model = _SharedInputs().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(3)
    batches = [torch.randn(16, 3, 12, 12, device="cuda", generator=g) * (1 + i) for i in range(6)]
    batches.append(torch.randn(7, 3, 12, 12, device="cuda", generator=g))
    counts = _shared_against_alone(model, lambda m: [m(x) for x in batches], monkeypatch, layers=6)
    assert set(counts.values()) == {7}


class _AuxHead(torch.nn.Module):
    """The data flow depends on a keyword: with aux=True two heads read the same tensor."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.head, self.aux_head = torch.nn.Linear(16, 10), torch.nn.Linear(16, 10)

    def forward(self, x, aux=False):
        p = torch.relu(self.stem(x)).mean(dim=(2, 3))
        return self.head(p) + (self.aux_head(p) if aux else 0)


def test_graph_replays_with_a_data_flow_that_changes_between_calls(kernels, monkeypatch):
    # A copy between two layers' states must not be captured: a replay after an eager call that fed
    # only one of them would copy a state made of batches the other never saw.
    torch.manual_seed(0)
    model = _AuxHead().cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(4)
    calls = [(torch.randn(16, 3, 12, 12, device="cuda", generator=g) * (1 + i), aux)
             for i, aux in enumerate([True, True, False, True, True, False, True])]
    _shared_against_alone(model, lambda m: [m(x, aux=aux) for x, aux in calls], monkeypatch, layers=3)
