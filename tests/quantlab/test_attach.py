"""Attaching quantizers: subclasses with their own forward, HF Conv1D, BERT, Llama."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import quantlab as ql
from quantlab.errors import NothingToQuantizeError


class PaddingConv2d(nn.Conv2d):
    """A Conv2d subclass that pads inside its own forward (reads self.weight itself)."""

    def forward(self, x):
        x = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def keys(model):
    return sorted(r.key for r in ql.iter_quantizers(model))


def calibrate_on(model, batches, calibrator="max"):
    ql.quantize(model, ql.int8_config(calibrator), forward_loop=lambda m: [m(b) for b in batches])
    return model


def test_subclass_with_own_forward_is_quantized():
    model = nn.Sequential(PaddingConv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    calibrate_on(model, [x])
    assert keys(model) == ["0:input", "0:weight", "2:input", "2:weight"]
    assert isinstance(model[0], PaddingConv2d)  # still the user's class (a parametrized subclass of it)
    out = model(x)
    assert not torch.equal(out, ref)  # quantization acts on the subclass's own weight read
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    with ql.quantization_disabled(model):
        assert torch.equal(model(x), ref)


def test_weight_is_fake_quantized_on_read():
    model = nn.Sequential(nn.Linear(8, 4))
    w = model[0].weight.detach().clone()
    calibrate_on(model, [torch.randn(3, 8)])
    per_row = w.abs().amax(dim=1, keepdim=True) / 127
    expected = torch.round(w * (1 / per_row)).clamp(-127, 127) * per_row
    assert torch.allclose(model[0].weight, expected, atol=0, rtol=1e-6)


def test_convtranspose_per_channel_axis_is_1():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.Conv1d(2, 2, 1) if False else nn.Identity())
    calibrate_on(model, [torch.randn(1, 4, 5, 5)])
    wq = ql.weight_quantizer(model[0])
    assert wq.spec.axis == 1 and wq.amax.shape == (6,)


def test_hf_conv1d_axis_1():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=12, nx=5)  # weight [in=5, out=12]
    model = nn.Sequential(layer)
    x = torch.randn(2, 7, 5)
    ref = model(x)
    calibrate_on(model, [x])
    wq = ql.weight_quantizer(layer)
    assert wq.spec.axis == 1 and wq.amax.shape == (12,)
    assert torch.allclose(wq.amax, layer.parametrizations.weight.original.abs().amax(dim=0))
    with ql.quantization_disabled(model):
        assert torch.equal(model(x), ref)
    assert (model(x) - ref).abs().max() < 0.05 * ref.abs().max()


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertModel(cfg).eval()


def test_bert_model_quantizes_every_linear_and_keeps_fp32_when_off():
    pytest.importorskip("transformers")
    model = _tiny_bert()
    ids = torch.randint(0, 100, (2, 9))
    ref = model(input_ids=ids).last_hidden_state
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    ql.quantize(model, ql.int8_config("max"), forward_loop=lambda m: m(input_ids=ids))
    quantized = sorted({r.module_name for r in ql.iter_quantizers(model)})
    assert quantized == linears and len(linears) == 2 * 6 + 1  # q,k,v,o,up,down per layer + pooler
    out = model(input_ids=ids).last_hidden_state
    assert not torch.equal(out, ref)
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
    with ql.quantization_disabled(model):
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)


def test_llama_with_exclude_patterns():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6))
    ref = model(ids).logits
    ql.quantize(model, ql.int8_config("max", exclude=("lm_head", "*.mlp.*")), forward_loop=lambda m: m(ids))
    names = {r.module_name for r in ql.iter_quantizers(model)}
    assert "lm_head" not in names and not any(".mlp." in n for n in names)
    assert {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")} == names
    with ql.quantization_disabled(model):
        assert torch.equal(model(ids).logits, ref)


def test_include_patterns_select_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    ql.quantize(model, ql.int8_config(include=("2",)))
    assert keys(model) == ["2:input", "2:weight"]


def test_nothing_quantizable_raises():
    with pytest.raises(NothingToQuantizeError, match="ReLU"):
        ql.quantize(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(NothingToQuantizeError, match="exclude"):
        ql.quantize(nn.Sequential(nn.Linear(2, 2)), ql.int8_config(exclude=("*",)))


def test_deepcopy_and_remove_restore_float_model():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(5, 4)
    ref = model(x)
    calibrate_on(model, [x])
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    ql.set_quantizer_amax(clone, "0", "input", 1e-3)  # the copy's quantizer is its own
    assert not torch.equal(clone(x), model(x))
    ql.remove_quantizers(model)
    assert not parametrize.is_parametrized(model[0]) and not ql.is_quantized(model)
    assert torch.equal(model(x), ref)


def test_amax_is_in_state_dict_and_reloads():
    model = calibrate_on(nn.Sequential(nn.Linear(4, 3)), [torch.randn(5, 4)])
    state = model.state_dict()
    assert "0.input_quantizer.amax" in state and "0.parametrizations.weight.0.amax" in state
    other = ql.quantize(nn.Sequential(nn.Linear(4, 3)))
    other.load_state_dict(state)
    assert torch.equal(ql.weight_quantizer(other[0]).amax, ql.weight_quantizer(model[0]).amax)


def test_module_called_with_keyword_input():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(input=x)

    model, x = KW(), torch.randn(4, 3)
    calibrate_on(model, [x])
    assert ql.iter_quantizers(model).__next__().quantizer.collector.num_batches == 1
    # every element counted: in a pass the keyword input goes through the stand-in forward (quantlab.pass_calls)
    assert int(ql.collected_statistics(model)["fc"].counts.sum()) == x.numel()


def test_cuda_graph_option_is_a_no_op_on_the_cpu():
    from quantlab.cuda_graphs import graphed_forward

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with graphed_forward(model) as graphed:
        assert graphed is None and "forward" not in model.__dict__


def test_statistics_pass_runs_every_module_in_eval_mode_and_restores_each():
    from quantlab import collect_statistics

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    model[1].train()  # a submodule left in training mode: its running stats must not move
    ql.quantize(model, ql.int8_config())
    before = model[1].running_mean.clone()
    modes = []
    collect_statistics(model, lambda m: (modes.append([x.training for x in m.modules()]), m(torch.randn(8, 4))))
    assert not any(modes[0])
    assert torch.equal(model[1].running_mean, before)
    assert [m.training for m in model] == [False, True, False]


def test_remove_quantizers_on_a_deep_copy_leaves_the_original_quantized_and_working():
    # torch.nn.utils.parametrize shares the Parametrized* class between a module and its deep
    # copies; removing the copy's weight quantizer must not take the original's weight with it.
    x = torch.randn(6, 4)
    model = calibrate_on(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), [x])
    before, fake_weight = model(x), model[0].weight.detach().clone()
    clone = copy.deepcopy(model)
    ql.remove_quantizers(clone)
    assert type(clone[0]) is nn.Linear and not ql.is_quantized(clone) and ql.get_config(clone) is None
    assert ql.is_quantized(model) and ql.get_config(model) is not None
    assert torch.equal(model[0].weight, fake_weight) and torch.equal(model(x), before)
    # ... and the other way round: the original's removal leaves a copy quantized.
    other = copy.deepcopy(model)
    ql.remove_quantizers(model)
    assert type(model[0]) is nn.Linear and ql.is_quantized(other) and torch.equal(other(x), before)


def test_a_model_calibrated_with_device_statistics_deep_copies():
    # On CUDA the statistics collectors hold the fused kernels' launcher (ctypes pointers, which
    # copy.deepcopy refuses); simulated on the CPU, where it is absent (test_statistics_cuda: the real one).
    import ctypes

    from quantlab.statistics import _DeviceAccumulator

    x = torch.randn(6, 4)
    model = calibrate_on(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), [x])
    for ref in ql.iter_quantizers(model):
        if ref.quantizer.collector is not None:
            spare = _DeviceAccumulator(ref.quantizer.num_bins, x)
            spare._kernels = ctypes.c_void_p(1)  # deepcopy refuses it
            ref.quantizer.collector._spare = spare
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    assert ql.collected_statistics(clone).keys() == ql.collected_statistics(model).keys()
    assert all(r.quantizer.collector is None or r.quantizer.collector._spare is None for r in ql.iter_quantizers(clone))


def test_attached_quantizers_take_the_mode_of_their_layer():
    import quantlab as ql
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].eval()
    ql.quantize(model, ql.int8_config())
    for layer in model:
        assert all(m.training is layer.training for m in layer.modules())


def test_a_statistics_pass_reads_the_weights_directly_and_runs_the_input_quantizers_own_hooks():
    from quantlab import collect_statistics

    model = nn.Sequential(PaddingConv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    ql.quantize(model, ql.int8_config())
    seen, hooked, classes = [], [], [type(m) for m in model]
    model[2].input_quantizer.register_forward_hook(lambda mod, args, out: hooked.append(args[0].shape))

    def forward_loop(m):
        seen.append([m[i].weight is m[i].parametrizations.weight.original for i in (0, 2)])
        for _ in range(2):
            m(torch.randn(2, 3, 6, 6))

    assert collect_statistics(model, forward_loop) == {"0": 2, "2": 2}
    assert seen == [[True, True]] and hooked == [torch.Size([2, 4, 6, 6])] * 2  # its hook: the module call
    # every element of both batches counted, through the hook's direct call (layer 0) and the module call (2)
    counted = {name: int(stats.counts.sum()) for name, stats in ql.collected_statistics(model).items()}
    assert counted == {"0": 2 * 2 * 3 * 36, "2": 2 * 2 * 4 * 36}
    assert [type(m) for m in model] == classes  # torch's parametrized classes again


def test_a_pass_runs_hooks_and_wrappers_on_the_quantizers_calls_it_would_otherwise_skip():
    """Direct weight reads and the hook's direct statistics call step aside where something watches those calls."""
    from quantlab import collect_statistics

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    ql.quantize(model, ql.int8_config())
    seen = {"weight quantizer": 0, "weight parametrizations": 0, "input forward": 0}
    model[0].parametrizations.weight[0].register_forward_hook(lambda *a: seen.__setitem__("weight quantizer", seen["weight quantizer"] + 1))
    model[2].parametrizations.weight.register_forward_hook(
        lambda *a: seen.__setitem__("weight parametrizations", seen["weight parametrizations"] + 1))
    quantizer = model[2].input_quantizer
    plain_forward = quantizer.forward

    def wrapped(x):  # a wrapper set on the instance (as accelerate's hooks are)
        seen["input forward"] += 1
        return plain_forward(x)

    quantizer.forward = wrapped
    assert collect_statistics(model, lambda m: [m(torch.randn(3, 4)) for _ in range(2)]) == {"0": 2, "2": 2}
    assert seen == {"weight quantizer": 2, "weight parametrizations": 2, "input forward": 2}
