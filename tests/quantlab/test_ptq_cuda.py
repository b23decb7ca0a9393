"""run_ptq on a CUDA model against the same model on the CPU (runs only where CUDA is available).

The statistics pass reads its device state back in one go and the apply stage reads the ranges
back as Python values (quantlab.statistics.read_many, quantlab.pipeline.apply.amax_values); the
CPU runs the host path. Counts, weight ranges and the ranges that max, percentile and entropy
choose must agree bit for bit.
"""
import copy

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.errors import NonFiniteActivationError
from quantlab.ptq import run_ptq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXACT = ["max", "percentile", "entropy"]  # mse on CUDA may differ within its tie bound


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


def batches(device):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 16, 16, generator=g) * s).to(device) for s in (1.0, 3.0, 0.5, 7.0)]


def run(model, device, bins=None):
    model = copy.deepcopy(model).to(device)
    ql.quantize(model, ql.int8_config())
    for name, size in (bins or {}).items():
        next(r for r in ql.iter_quantizers(model) if r.module_name == name and r.role == "input").quantizer.num_bins = size
    return run_ptq(model, batches(device), EXACT)


@pytest.mark.parametrize("bins", [None, {"3": 1024}], ids=["same bins", "one tensor with other bins"])
def test_cuda_run_equals_cpu_run(bins):
    model = cnn()
    on_cpu, on_cuda = run(model, "cpu", bins), run(model, "cuda", bins)
    for name in EXACT:
        cpu, cuda = on_cpu.scales[name], on_cuda.scales[name]
        assert [(e.key, e.amax) for e in cuda.entries] == [(e.key, e.amax) for e in cpu.entries], name
        assert sorted(cuda.statistics) == sorted(cpu.statistics) == ["0", "3", "6"]
        for module, stats in cpu.statistics.items():
            theirs = cuda.statistics[module]
            assert (theirs.bin_width, theirs.amax) == (stats.bin_width, stats.amax)
            assert torch.equal(theirs.counts.cpu(), stats.counts)


def test_non_finite_input_on_cuda_names_the_layer():
    model = cnn().cuda()
    data = batches("cuda")
    data[2][0, 0, 0, 0] = float("inf")
    ql.quantize(model, ql.int8_config())
    with pytest.raises(NonFiniteActivationError, match="'0'"):
        run_ptq(model, data, ["max"])
