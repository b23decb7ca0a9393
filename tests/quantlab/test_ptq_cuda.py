"""run_ptq on a CUDA model against the CPU pipeline on the same activations (runs only where CUDA is available).

The statistics pass reads its device state back in one go and the apply stage reads the ranges
back as Python values (quantlab.statistics.read_many, quantlab.pipeline.apply.amax_values). On
the same activations, the host path's counts, the weights' ranges and the ranges that max,
percentile and entropy choose one tensor at a time must agree with them bit for bit.
"""
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.calibrators import get_calibrator
from quantlab.errors import NonFiniteActivationError
from quantlab.ptq import run_ptq
from quantlab.statistics import HistogramCollector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXACT = ["max", "percentile", "entropy"]  # mse on CUDA may differ within its tie bound


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


def batches(device):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 16, 16, generator=g) * s).to(device) for s in (1.0, 3.0, 0.5, 7.0)]


@pytest.mark.parametrize("bins", [{}, {"3": 1024}], ids=["same bins", "one tensor with other bins"])
def test_cuda_run_equals_the_cpu_pipeline_on_the_same_activations(bins):
    # cuDNN's convolutions round differently from the CPU's, so the reference is the CPU host path
    # and per-tensor calibrators fed the very activations the CUDA pass counted.
    model = cnn().cuda()
    seen = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, layer in layers.items():  # registered before quantlab's hook: sees what the quantizer sees
        layer.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].detach().cpu()))
    ql.quantize(model, ql.int8_config())
    for ref in ql.iter_quantizers(model):
        if ref.role == "input" and ref.module_name in bins:
            ref.quantizer.num_bins = bins[ref.module_name]
    result = run_ptq(model, batches("cuda"), EXACT)
    assert sorted(seen) == ["0", "3", "6"] and all(len(v) == 4 for v in seen.values())
    for name in EXACT:
        scales = result.scales[name]
        for module, inputs in seen.items():
            reference = HistogramCollector(bins.get(module, 2048), sync_free=False)
            for x in inputs:
                reference.update(x)
            stats, theirs = reference.stats(), scales.statistics[module]
            assert (theirs.bin_width, theirs.amax) == (stats.bin_width, stats.amax)
            assert torch.equal(theirs.counts.cpu(), stats.counts)
            chosen = float(get_calibrator(name)(stats, num_bits=8))
            assert scales.get(module, "input").amax == float(torch.tensor(chosen, dtype=torch.float32)), (name, module)
            weight = layers[module].parametrizations.weight.original.detach().cpu()
            per_channel = weight.abs().amax(dim=tuple(range(1, weight.dim()))).tolist()
            assert scales.get(module, "weight").amax == per_channel


def test_non_finite_input_on_cuda_names_the_layer():
    model = cnn().cuda()
    data = batches("cuda")
    data[2][0, 0, 0, 0] = float("inf")
    ql.quantize(model, ql.int8_config())
    with pytest.raises(NonFiniteActivationError, match="'0'"):
        run_ptq(model, data, ["max"])


class SharedInputs(nn.Module):
    """A block input feeding two convolutions (as a residual block's first convolution and its
    shortcut) and hidden states feeding three linears (as Q, K and V)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1, bias=False)
        self.q, self.k, self.v = (nn.Linear(8 * 14 * 14, 10) for _ in range(3))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        f = torch.flatten(torch.relu(self.a(h) + self.b(h)), 1)
        return self.q(f) + self.k(f) * self.v(f)


def test_a_tensor_feeding_several_layers_is_read_once_and_counted_for_each(monkeypatch):
    from quantlab.kernels import histogram_cuda

    model = SharedInputs().cuda().eval()
    seen = {}
    for name, layer in model.named_children():
        layer.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].detach().cpu()))
    ql.quantize(model, ql.int8_config())
    launches = []
    original = histogram_cuda.FusedHistogram.enqueue
    monkeypatch.setattr(histogram_cuda.FusedHistogram, "enqueue",
                        lambda self, *args: (launches.append(1), original(self, *args)))
    result = run_ptq(model, batches("cuda"), EXACT)
    assert len(launches) == 3 * 4  # three distinct tensors per batch, not six
    for name in EXACT:
        for module, inputs in seen.items():
            reference = HistogramCollector(2048, sync_free=False)
            for x in inputs:
                reference.update(x)
            stats, theirs = reference.stats(), result.scales[name].statistics[module]
            assert (theirs.bin_width, theirs.amax) == (stats.bin_width, stats.amax)
            assert torch.equal(theirs.counts.cpu(), stats.counts), module
            chosen = float(get_calibrator(name)(stats, num_bits=8))
            assert result.scales[name].get(module, "input").amax == float(torch.tensor(chosen, dtype=torch.float32))


def test_the_deferred_run_equals_the_pass_read_back_at_its_end():
    """run_ptq enqueues the calibrators behind the pass and reads back once; collecting with the
    read-back at the pass's end, then run_calibrators, must give the same scales and statistics."""
    from quantlab.pipeline import collect
    from quantlab.ptq import run_calibrators

    names = ["max", "percentile", "entropy", "mse"]
    deferred_model = cnn().cuda()
    ql.quantize(deferred_model, ql.int8_config())
    deferred = run_ptq(deferred_model, batches("cuda"), names).scales
    model = cnn().cuda()
    ql.quantize(model, ql.int8_config())
    statistics = collect(model, lambda m: [m(x) for x in batches("cuda")])
    assert statistics.pending is None
    read_at_end, _ = run_calibrators(model, names)
    for name in names:
        assert deferred[name].as_dict() == read_at_end[name].as_dict(), name
        for module, theirs in read_at_end[name].statistics.items():
            ours = deferred[name].statistics[module]
            assert (ours.amax, ours.bin_width) == (theirs.amax, theirs.bin_width)
            assert torch.equal(ours.counts, theirs.counts)
