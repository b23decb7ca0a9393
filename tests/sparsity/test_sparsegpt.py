"""SparseGPT: 2:4 masks chosen from the layer inputs, with the kept weights updated to compensate."""
import pytest
import torch
from torch import nn

from quantlab import sparsity
from quantlab.sparsity.pruning import collect_hessians, sparsegpt_2to4
from quantlab.sparsity.pattern import select_layers


def _correlated_inputs(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, k, generator=g)
    return torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)


def _output_error(layer_weight, pruned_weight, x):
    return float((x @ (layer_weight - pruned_weight).t()).norm() / (x @ layer_weight.t()).norm())


def test_sparsegpt_beats_magnitude_on_the_layer_output_and_keeps_2to4():
    torch.manual_seed(0)
    x = _correlated_inputs()
    w = torch.randn(32, 64)
    new, keep = sparsegpt_2to4(w, x.double().t() @ x.double(), block_size=16)
    assert sparsity.is_2to4(new, 1) and torch.equal(new != 0, keep & (new != 0))
    magnitude = w * sparsity.mask_2to4(w, 1)
    assert _output_error(w, new, x) < 0.7 * _output_error(w, magnitude, x)


def test_prune_with_sparsegpt_uses_the_calibration_inputs_and_reports_the_method():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Conv1d(1, 4, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            h = self.body[2](self.body[1](self.body[0](x)))
            return self.body[3](h.unsqueeze(1))

    net, x = Net(), _correlated_inputs()
    reference = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    batches = [x[i:i + 128] for i in range(0, 512, 128)]
    hessians = collect_hessians(net, select_layers(net, ["body.0"]).targets, batches)
    assert hessians["body.0"][1] == 512
    report = sparsity.prune(net, "sparsegpt", data=batches, exclude=["body.3"])
    assert {(layer.name, layer.method) for layer in report.layers} == {("body.0", "sparsegpt"), ("body.2", "sparsegpt")}
    first = net.body[0].parametrizations.weight.original
    assert sparsity.is_2to4(first, 1)
    assert _output_error(reference["body.0"], first.detach(), x) < _output_error(
        reference["body.0"], reference["body.0"] * sparsity.mask_2to4(reference["body.0"], 1), x)
    # A conv selected with sparsegpt is pruned by magnitude (and the report says so).
    conv_model = nn.Sequential(nn.Conv2d(8, 8, 1))
    rep = sparsity.prune(conv_model, "sparsegpt", data=[torch.randn(2, 8, 3, 3)])
    assert rep.layers[0].method == "magnitude"


def test_sequential_collection_and_bad_options():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    data = [torch.randn(64, 16)]
    report = sparsity.prune(model, "sparsegpt", data=data, sequential=True)
    assert [layer.method for layer in report.layers] == ["sparsegpt", "sparsegpt"]
    with pytest.raises(sparsity.SparsityError, match="block_size must be a positive multiple of 4"):
        sparsity.prune(nn.Sequential(nn.Linear(16, 16)), "sparsegpt", data=data, block_size=6)
    with pytest.raises(sparsity.SparsityError, match="empty calibration data"):
        sparsity.prune(nn.Sequential(nn.Linear(16, 16)), "sparsegpt", data=[])
