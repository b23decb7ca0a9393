"""A statistics pass's layer calls (quantlab.pass_calls): direct weight reads, the input hook run from forward."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import quantlab as ql
from quantlab.attach import is_input_hook
from quantlab.pass_calls import direct_weight_reads, pass_calls


def calibrate_on(model, batches, calibrator="max"):
    ql.quantize(model, ql.int8_config(calibrator), forward_loop=lambda m: [m(b) for b in batches])
    return model


def pre_hooks(module):
    """(kind, with_kwargs) of each forward pre-hook, in the order they run."""
    return [("quantlab" if is_input_hook(h) else h.__name__, module._forward_pre_hooks_with_kwargs.get(k, False))
            for k, h in module._forward_pre_hooks.items()]


class Doubled(nn.Module):
    """A parametrization stacked on a quantized weight (as a 2:4 mask is)."""

    def forward(self, w):
        return 2 * w


def test_direct_weight_reads_return_what_a_read_returns_outside_and_put_each_class_back():
    x = torch.randn(6, 4)
    model = calibrate_on(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), [x])
    parametrize.register_parametrization(model[2], "weight", Doubled())  # [quantizer, Doubled]
    classes = [type(m) for m in model]
    quantized = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    with direct_weight_reads(model):
        assert type(model[0]) is not classes[0] and isinstance(model[0], classes[0])
        # quantizers on: the parametrizations run, as outside
        assert torch.equal(model[0].weight, quantized[0]) and torch.equal(model[2].weight, quantized[1])
        with ql.quantization_disabled(model):
            assert model[0].weight is model[0].parametrizations.weight.original  # read directly
            assert torch.equal(model[2].weight, 2 * model[2].parametrizations.weight.original)  # not the only one
        clone = copy.deepcopy(model)
    assert [type(m) for m in model] == classes and type(clone[0]) is classes[0]
    assert torch.equal(model[0].weight, quantized[0]) and torch.equal(clone(x), model(x))
    ql.remove_quantizers(clone)  # the copy's class is torch's again: removal leaves a plain layer
    assert type(clone[0]) is nn.Linear and torch.equal(model[0].weight, quantized[0])


def test_direct_weight_reads_put_the_classes_back_when_the_block_raises():
    model = calibrate_on(nn.Sequential(nn.Linear(4, 4)), [torch.randn(3, 4)])
    cls = type(model[0])
    with pytest.raises(RuntimeError, match="inside"):
        with direct_weight_reads(model):
            raise RuntimeError("inside")
    assert type(model[0]) is cls


def test_direct_weight_reads_inside_another_block_change_nothing_more():
    model = calibrate_on(nn.Sequential(nn.Linear(4, 4)), [torch.randn(3, 4)])
    cls = type(model[0])
    with ql.quantization_disabled(model), direct_weight_reads(model):
        outer = type(model[0])
        with direct_weight_reads(model):
            assert type(model[0]) is outer
            clone = copy.deepcopy(model)
        assert type(model[0]) is outer and model[0].weight is model[0].parametrizations.weight.original
    assert type(model[0]) is cls and type(clone[0]) is cls
    ql.remove_quantizers(clone)
    assert type(clone[0]) is nn.Linear


def doubling(module, args):
    return (2 * args[0],)


def test_in_a_pass_the_input_hook_runs_from_forward_so_the_call_takes_torchs_fast_path():
    x = torch.randn(5, 4)
    model = calibrate_on(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), [x])
    before, classes, keys = model(x), [type(m) for m in model], [list(m._forward_pre_hooks) for m in model]
    seen = []

    def forward_loop(m):
        seen.append([dict(layer._forward_pre_hooks) for layer in (m[0], m[2])])
        for _ in range(3):
            m(x)

    assert ql.collect_statistics(model, forward_loop) == {"0": 3, "2": 3}
    assert seen == [[{}, {}]]  # no hook left on the layers: nn.Module calls forward directly
    stats = ql.collected_statistics(model)
    assert int(stats["0"].counts.sum()) == 3 * x.numel() and stats["0"].amax == pytest.approx(float(x.abs().max()))
    assert [type(m) for m in model] == classes and [list(m._forward_pre_hooks) for m in model] == keys
    assert pre_hooks(model[0]) == [("quantlab", True)]
    ql.calibrate(model, "max")
    assert torch.allclose(model(x), before, atol=0.1) and not torch.equal(model(x), ql.remove_quantizers(copy.deepcopy(model))(x))


def test_a_user_hook_before_quantlabs_still_runs_first_and_one_after_it_keeps_the_hook_in_place():
    x = torch.randn(5, 4)
    first = nn.Linear(4, 4)
    first.register_forward_pre_hook(doubling)  # registered before quantlab's: it runs first either way
    model = nn.Sequential(first, nn.Linear(4, 2))
    ql.quantize(model, ql.int8_config("max"))
    model[1].register_forward_pre_hook(doubling)  # after quantlab's: quantlab observes the undoubled input
    moved = []

    def forward_loop(m):
        moved.append([pre_hooks(layer) for layer in m])
        m(x)

    ql.collect_statistics(model, forward_loop)
    assert moved == [[[("doubling", False)], [("quantlab", True), ("doubling", False)]]]
    stats = ql.collected_statistics(model)
    assert stats["0"].amax == pytest.approx(2 * float(x.abs().max()))  # the doubled input
    with torch.no_grad():
        hidden = model[0].parametrizations.weight.original @ (2 * x).T
        hidden = hidden.T + model[0].bias
    assert stats["1"].amax == pytest.approx(float(hidden.abs().max()), rel=1e-6)  # before its doubling
    assert pre_hooks(model[0]) == [("doubling", False), ("quantlab", True)]


def test_a_layer_with_a_forward_of_its_own_on_the_instance_keeps_the_hook_and_is_observed():
    x = torch.randn(5, 4)
    model = nn.Sequential(nn.Linear(4, 2))
    ql.quantize(model, ql.int8_config("max"))
    layer, calls = model[0], []
    plain = layer.forward

    def wrapped(*args, **kwargs):  # as accelerate's hooks wrap a module's forward
        calls.append(1)
        return plain(*args, **kwargs)

    layer.forward = wrapped
    during = []
    ql.collect_statistics(model, lambda m: (during.append(pre_hooks(m[0])), m(x)))
    assert during == [[("quantlab", True)]] and calls == [1]
    assert int(ql.collected_statistics(model)["0"].counts.sum()) == x.numel()


def test_a_copy_made_in_the_block_has_the_hook_and_hooks_registered_in_it_run_after_quantlabs_later():
    x = torch.randn(5, 4)
    model = calibrate_on(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), [x])
    cls, reference = type(model[0]), copy.deepcopy(model)
    with pass_calls(model):
        assert type(model[0]) is not cls and not model[0]._forward_pre_hooks
        clone = copy.deepcopy(model)
        model[0].register_forward_pre_hook(doubling)
        model[2].register_forward_pre_hook(doubling, prepend=True)
    assert type(clone[0]) is cls and pre_hooks(clone[0]) == [("quantlab", True)]
    assert torch.equal(clone(x), reference(x))  # inputs quantized by the clone's own hooks, as the model's were
    with ql.quantization_disabled(reference):
        assert not torch.equal(clone(x), reference(x))
    assert pre_hooks(model[0]) == [("quantlab", True), ("doubling", False)]
    # quantlab's was the only hook: one prepended inside the block cannot be told from one appended
    assert pre_hooks(model[2]) == [("quantlab", True), ("doubling", False)]


def test_pass_calls_put_classes_and_hooks_back_when_the_block_raises():
    model = calibrate_on(nn.Sequential(nn.Linear(4, 4)), [torch.randn(3, 4)])
    cls, keys = type(model[0]), list(model[0]._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="inside"):
        with pass_calls(model):
            raise RuntimeError("inside")
    assert type(model[0]) is cls and list(model[0]._forward_pre_hooks) == keys
    assert pre_hooks(model[0]) == [("quantlab", True)] and "_quantlab_moved_input_hook" not in model[0].__dict__
