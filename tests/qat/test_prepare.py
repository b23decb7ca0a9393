"""prepare / save / load / convert and the quantization toggles on real Fashion-MNIST batches."""
import copy
import json

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab import qat
from quantlab.qat.quantizer import QATQuantizer
from quantlab.ptq import run_ptq
from tests.qat.models import TinyCNN, tiny_cnn


@pytest.fixture()
def scales_file(tmp_path, calib_loader):
    result = run_ptq(tiny_cnn(), calib_loader, ["entropy"])
    return result.scales["entropy"].save(tmp_path / "scales.entropy.json")


def _train_steps(model, batches, steps=3, lr=1e-2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_prepare_from_scales_file_starts_at_the_ptq_model(scales_file, fmnist_small):
    _, test = fmnist_small
    ptq = ql.load_scales(tiny_cnn(), scales_file).eval()
    model = qat.prepare(tiny_cnn(), scales=scales_file, weight_ranges="fixed").eval()
    x = test[0][0]
    assert torch.equal(model(x), ptq(x))
    refs = list(ql.iter_quantizers(model))
    assert refs and all(isinstance(r.quantizer, QATQuantizer) for r in refs)
    assert qat.qat_options(model).calibrator == "entropy"


def test_weight_range_modes(scales_file, fmnist_small):
    _, test = fmnist_small
    amax = {}
    for mode in ("recompute", "fixed", "learn"):
        model = qat.prepare(tiny_cnn(), scales=scales_file, weight_ranges=mode)
        before = ql.weight_quantizer(model.pw).amax.detach().clone()
        _train_steps(model, test, lr=0.05)
        model.eval()(test[0][0])  # a forward after the last update
        after = ql.weight_quantizer(model.pw).amax.detach()
        weight = model.pw.parametrizations.weight.original.detach()
        amax[mode] = (before, after, weight.abs().amax(dim=(1, 2, 3)))
        learned = [n for n, p in model.named_parameters() if n.endswith("amax")]
        assert bool(learned) == (mode == "learn")
    before, after, wmax = amax["recompute"]
    assert torch.equal(after, wmax) and not torch.equal(before, after)
    before, after, _ = amax["fixed"]
    assert torch.equal(before, after)
    before, after, _ = amax["learn"]
    assert not torch.equal(before, after)


def test_learnable_activation_ranges_get_lsq_gradients(scales_file, fmnist_small):
    _, test = fmnist_small
    model = qat.prepare(tiny_cnn(), scales=scales_file, learn_amax=True)
    amax = model.pw.input_quantizer.amax
    assert isinstance(amax, nn.Parameter)
    start = amax.detach().clone()
    model.train()
    x, y = test[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert amax.grad is not None and amax.grad.item() != 0.0
    # Adam: the step does not scale with the gradient, which is small when few values clip.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for x, y in test[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert amax.item() != start.item()
    assert qat.set_amax_trainable(model, False) == len([n for n, _ in model.named_parameters() if n.endswith("amax")])
    assert not amax.requires_grad


def test_prepare_calibrates_from_data_and_toggles(calib_loader, fmnist_small):
    _, test = fmnist_small
    reference = tiny_cnn().eval()
    model = qat.prepare(copy.deepcopy(reference), data=calib_loader, calibrator="percentile",
                        calibrator_params={"percentile": 99.9}).eval()
    assert qat.qat_options(model).calibrator == "percentile"
    x = test[0][0]
    quantized = model(x)
    assert not torch.equal(quantized, reference(x))
    with qat.enabled(model, False):
        assert torch.equal(model(x), reference(x))
        with qat.enabled(model, True):
            assert torch.equal(model(x), quantized)
        assert torch.equal(model(x), reference(x))
    with qat.quantization_disabled(model):
        assert torch.equal(model(x), reference(x))
    qat.set_enabled(model, False)
    assert torch.equal(model(x), reference(x))
    qat.set_enabled(model, True)
    assert torch.equal(model(x), quantized)


def test_save_load_round_trip_is_weights_only_and_exact(scales_file, fmnist_small, tmp_path):
    _, test = fmnist_small
    model = qat.prepare(tiny_cnn(), scales=scales_file, learn_amax=True, weight_ranges="learn")
    _train_steps(model, test)
    model.eval()
    files = qat.save(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.pt", "qat.json", "scales.json"]
    state = torch.load(files["weights"], weights_only=True)
    assert "pw.weight" in state and not any("amax" in k or "parametrizations" in k for k in state)
    TinyCNN().load_state_dict(state)  # the original architecture, strict
    loaded = qat.load(tiny_cnn(), tmp_path / "out").eval()
    x = test[1][0]
    assert torch.equal(loaded(x), model(x))
    in_memory = qat.convert(model, tiny_cnn()).eval()
    assert torch.equal(in_memory(x), model(x))
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["options"]["learn_amax"] is True and manifest["options"]["weight_ranges"] == "learn"
    assert ql.Scales.load(files["scales"]).get("pw", "input").amax == pytest.approx(model.pw.input_quantizer.amax.item())


def test_scales_that_do_not_match_the_model_name_the_layers(tmp_path, calib_loader):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(1, 4, 3)
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))

    other = run_ptq(Other(), calib_loader, ["max"]).scales["max"].save(tmp_path / "other.json")
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ql.ScalesMismatchError, match="body") as info:
        qat.prepare(model, scales=other, fold_bn=True)
    assert "pw" in str(info.value)
    # Nothing half-done: no quantizers, the BatchNorms are back, the weights unchanged.
    assert not ql.is_quantized(model) and not qat.is_prepared(model)
    assert isinstance(model.dw_bn, nn.BatchNorm2d) and type(model.dw) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_options_and_inputs(scales_file, tmp_path):
    with pytest.raises(qat.QATError, match="weight_ranges"):
        qat.prepare(tiny_cnn(), scales=scales_file, weight_ranges="sometimes")
    with pytest.raises(qat.QATError, match="starting ranges"):
        qat.prepare(tiny_cnn())
    model = qat.prepare(tiny_cnn(), scales=scales_file)
    with pytest.raises(qat.QATError, match="already prepared"):
        qat.prepare(model, scales=scales_file)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "quantlab.scales", "version": 1, "quantizers": [')
    with pytest.raises(ql.ScalesFormatError, match="broken.json"):
        qat.prepare(tiny_cnn(), scales=broken)
    with pytest.raises(qat.QATError, match="qat.json"):
        qat.load(tiny_cnn(), tmp_path / "nothing-here")
    out = tmp_path / "saved"
    qat.save(model, out)
    (out / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(qat.QATError, match="model.pt"):
        qat.load(tiny_cnn(), out)


def test_prepare_keeps_ranges_of_an_already_calibrated_model(calib_loader, fmnist_small):
    _, test = fmnist_small
    from quantlab.batching import forward_loop

    model = ql.quantize(tiny_cnn(), ql.int8_config("mse"), forward_loop=forward_loop(calib_loader))
    before = {r.key: r.quantizer.amax.clone() for r in ql.iter_quantizers(model)}
    x = test[0][0]
    expected = model.eval()(x)
    qat.prepare(model, weight_ranges="fixed")
    assert all(torch.equal(before[r.key], r.quantizer.amax) for r in ql.iter_quantizers(model))
    assert torch.equal(model(x), expected)


def test_failed_prepare_with_a_config_leaves_no_quantizers(tmp_path, calib_loader):
    scales = run_ptq(tiny_cnn(), calib_loader, ["max"]).scales["max"]
    other = ql.Scales(entries=[e for e in scales.entries if e.module != "fc"], calibrator="max")
    model = tiny_cnn()
    with pytest.raises(ql.ScalesMismatchError, match="'fc:weight' has no scale"):
        qat.prepare(model, scales=other, config=ql.int8_config())
    assert not ql.is_quantized(model) and ql.get_config(model) is None
