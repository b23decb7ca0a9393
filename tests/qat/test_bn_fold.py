"""Conv+BN folding for QAT: equal to Conv+BN without quantization, quantizes the folded weight."""
import copy

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab import qat
from quantlab.qat.bn_fold import QATConvBn2d, find_conv_bn_pairs, fold_conv_bn, undo_fold
from tests.qat.models import randomize_bn, tiny_cnn


def _folded_pair(bias: bool, groups: int = 1):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6 if groups == 1 else 4, 3, padding=1, bias=bias, groups=groups)
    bn = nn.BatchNorm2d(conv.out_channels)
    reference = randomize_bn(nn.Sequential(conv, bn))
    model = copy.deepcopy(reference)
    fold_conv_bn(model, [("0", "1")])
    return reference, model


@pytest.mark.parametrize("bias,groups", [(False, 1), (True, 1), (True, 4)], ids=["nobias", "bias", "depthwise"])
def test_folded_module_equals_conv_bn_in_train_and_eval_without_quantization(bias, groups):
    reference, model = _folded_pair(bias, groups)
    assert isinstance(model[0], QATConvBn2d) and isinstance(model[1], nn.Identity)
    x = torch.randn(5, 4, 9, 9) * 2 + 0.5
    for mode in ("train", "eval", "train"):
        reference.train(mode == "train")
        model.train(mode == "train")
        expected = reference(x)
        got = model(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), f"{mode}: max diff {(got - expected).abs().max()}"
    # Training updated the running statistics identically.
    assert torch.allclose(model[0].bn.running_mean, reference[1].running_mean, atol=1e-6)
    assert torch.allclose(model[0].bn.running_var, reference[1].running_var, atol=1e-6)
    # Gradients flow to the conv weight and the BN affine parameters like in the unfolded pair.
    model.train(), reference.train()
    probe = torch.randn_like(reference(x))  # a loss a train-mode BN output does not make constant
    (model(x) * probe).sum().backward()
    (reference(x) * probe).sum().backward()
    assert torch.allclose(model[0].weight.grad, reference[0].weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(model[0].bn.weight.grad, reference[1].weight.grad, rtol=1e-4, atol=1e-4)


def test_quantization_off_equals_conv_bn_after_prepare():
    """With quantizers attached but disabled, the prepared folded model is the FP32 model."""
    reference = randomize_bn(tiny_cnn())
    model = copy.deepcopy(reference)
    x = torch.randn(8, 1, 28, 28)
    qat.prepare(model, data=[(x, None)], calibrator="max", fold_bn=True)
    for train in (False, True):
        reference.train(train), model.train(train)
        with qat.quantization_disabled(model):
            assert torch.allclose(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_weight_quantizer_sees_the_folded_weight():
    reference, model = _folded_pair(bias=True)
    ql.quantize(model)
    q = ql.weight_quantizer(model[0])
    seen = {}
    q.register_forward_hook(lambda mod, inp, out: seen.setdefault("w", inp[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        model[0].bn.running_var.mul_(4.0)  # changes the folding factor, not the raw weight
    model(torch.randn(1, 4, 5, 5))
    conv, bn = reference[0], model[0].bn
    expected = conv.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    assert torch.allclose(seen["w"], expected, atol=1e-6)


def test_freeze_bn_after_n_steps_uses_running_statistics():
    reference, model = _folded_pair(bias=False)
    model[0].freeze_bn_after = 2
    model.train()
    x = torch.randn(4, 4, 6, 6)
    for _ in range(2):
        model(x)
    assert not model[0].bn_frozen
    mean_before = model[0].bn.running_mean.clone()
    out = model(x)  # third training step: frozen
    assert model[0].bn_frozen and model[0].bn.training is False
    assert torch.equal(model[0].bn.running_mean, mean_before)
    model.eval()
    assert torch.allclose(out, model(x), atol=1e-6), "frozen BN in train mode must compute the eval function"
    # The counter and the flag travel with the state_dict (resume).
    state = model.state_dict()
    _, other = _folded_pair(bias=False)
    other.load_state_dict(state)
    assert other[0].train_steps == 3 and other[0].bn_frozen


def test_pairs_found_by_tracing_and_undo_restores_modules():
    model = tiny_cnn()
    pairs = find_conv_bn_pairs(model)
    assert pairs == [("stem.0", "stem.1"), ("dw", "dw_bn"), ("pw", "pw_bn")]
    stem_weight = model.stem[0].weight
    fold_conv_bn(model)
    assert model.stem[0].weight is stem_weight  # the same Parameter: optimizers keep working
    undo_fold(model)
    assert type(model.stem[0]) is nn.Conv2d and isinstance(model.dw_bn, nn.BatchNorm2d)
    assert model.stem[0].weight is stem_weight


def test_cannot_fold_a_wrong_pair_names_it():
    model = tiny_cnn()
    with pytest.raises(qat.QATError, match="'fc'"):
        fold_conv_bn(model, [("fc", "dw_bn")])


def test_saved_folded_model_loads_into_original_class_and_matches(tmp_path):
    model = randomize_bn(tiny_cnn())
    x = torch.randn(16, 1, 28, 28)
    qat.prepare(model, data=[(x, None)], calibrator="max", fold_bn=True, freeze_bn_after=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    expected = model(x)
    qat.save(model, tmp_path)
    loaded = qat.load(tiny_cnn(), tmp_path).eval()
    assert type(loaded.dw_bn) is nn.BatchNorm2d  # the original layout
    got = loaded(x)
    # Same INT8 model up to float rounding (a rare activation may land on the next grid point).
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4) or (got - expected).abs().gt(1e-4).float().mean() < 0.01
    with ql.quantization_disabled(loaded), qat.quantization_disabled(model):
        assert torch.allclose(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_freeze_bn_stats_on_plain_batchnorm_survives_model_train():
    model = randomize_bn(tiny_cnn())
    assert qat.freeze_bn_stats(model) == 3
    model.train()
    mean = model.dw_bn.running_mean.clone()
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert torch.equal(model.dw_bn.running_mean, mean)
    model.eval()
    assert torch.allclose(out, model(x), atol=1e-6)


def test_a_conv_whose_input_is_shifted_keeps_its_batchnorm():
    # input-shift adds shift * sum(W) after the conv's output: folded with its BatchNorm that would
    # land after the BatchNorm (and the folded module would drop the hooks). Such a conv is not paired.
    from quantlab.algorithms import AlgorithmContext, get_algorithm

    model = randomize_bn(tiny_cnn()).eval()
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]

    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    details = get_algorithm("input-shift").run(model, AlgorithmContext(forward_loop=loop))
    assert "pw" in details["shifted"]
    reference = copy.deepcopy(model)
    assert find_conv_bn_pairs(model) == [("stem.0", "stem.1"), ("dw", "dw_bn")]
    fold_conv_bn(model)
    torch.testing.assert_close(model(data[0]), reference(data[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(qat.QATError, match="moved by input-shift"):
        fold_conv_bn(model, [("pw", "pw_bn")])
