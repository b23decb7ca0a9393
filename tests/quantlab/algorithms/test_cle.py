"""cle: keeps the FP32 function, equalizes ranges, reports what it skipped, and lowers INT8 error."""
import copy

import pytest
import torch
from torch import nn

import quantlab
from quantlab.algorithms import AlgorithmContext, AlgorithmError, get_algorithm, list_algorithms
from quantlab.algorithms.cle import ChannelClamp, cross_layer_equalize
from quantlab.config import int8_config
from tests.quantlab.algorithms.nets import MobileBlockNet, SamePadConv2d, spread_channels


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _pair(details, first):
    return next(p for p in details["pairs"] if p["first"] == first)


def test_shared_relu6_becomes_exact_per_channel_clamps():
    model = MobileBlockNet(relu6_shared=True)
    x = torch.randn(4, 3, 12, 12) * 2
    expected = model(x)
    details = cross_layer_equalize(model)
    assert len(details["bn_fold"]["folded"]) == 4  # cle folds BatchNorms itself
    assert {(p["first"], p["second"]) for p in details["pairs"]} == {("stem", "dw"), ("dw", "pw"), ("pw", "fc1"), ("fc1", "fc2")}
    # the shared ReLU6 became a ReLU, its per-channel bounds sit in the folded BNs' places
    assert isinstance(model.act, nn.ReLU) and isinstance(model.bn0, ChannelClamp) and isinstance(model.bn1, ChannelClamp)
    assert details["clips"] == [{"module": "act", "was": "ReLU6", "now": "ReLU", "upper_bounds_in": ["bn0", "bn1"]}]
    assert isinstance(model.stem, SamePadConv2d)  # the subclass stays itself
    assert details["converged"]
    _same(model(x), expected)
    # a bound scaled with its channel: 6 / s_i, different per channel
    assert model.bn1.upper.flatten().unique().numel() > 1


def test_unshared_relu6_becomes_a_channel_clamp_and_ranges_equalize():
    model = MobileBlockNet(relu6_shared=False)
    x = torch.randn(4, 3, 12, 12) * 2
    expected = model(x)
    dw_ranges_before = model.dw.weight.detach().abs().flatten(1).amax(1)
    details = cross_layer_equalize(model)
    assert isinstance(model.act, ChannelClamp) and isinstance(model.act2, ChannelClamp)
    _same(model(x), expected)
    for first in ("stem", "dw", "pw", "fc1"):
        pair = _pair(details, first)
        assert pair["max_range_mismatch_after"] < 1.01  # r1_i == r2_i after equalization
    assert _pair(details, "dw")["max_range_mismatch_before"] > 5
    # the measurable property: per-channel weight ranges of the depthwise conv get closer (spread max/min falls)
    dw_ranges_after = model.dw.weight.detach().abs().flatten(1).amax(1)
    spread = lambda r: float(r.max() / r.min())  # noqa: E731
    assert spread(dw_ranges_after) < spread(dw_ranges_before) / 3
    r1 = model.dw.weight.detach().abs().flatten(1).amax(1)
    r2 = model.pw.weight.detach().abs().amax(0).flatten()
    torch.testing.assert_close(r1, r2, rtol=1e-2, atol=0)


def test_relu6_skip_policy_keeps_clips_and_reports_pairs():
    model = MobileBlockNet(relu6_shared=False)
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    details = get_algorithm("cle").run(model, AlgorithmContext(params={"relu6": "skip"}))
    assert {(p["first"], p["second"]) for p in details["pairs"]} == {("pw", "fc1"), ("fc1", "fc2")}
    skipped = {s["first"]: s["reason"] for s in details["skipped"]}
    assert "not positive-homogeneous" in skipped["stem"] and "not positive-homogeneous" in skipped["dw"]
    assert isinstance(model.act, nn.ReLU6) and isinstance(model.act2, nn.ReLU6)
    _same(model(x), expected)


class SharedClipNoSlot(nn.Module):
    """A ReLU6 shared by two sites, one directly after a conv (no folded-BN slot): those pairs are skipped."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(4, 4, 1)
        self.clip = nn.ReLU6()
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.b(self.clip(self.a(x)))
        x = self.d(self.relu(self.c(self.clip(x) * 1.0)))
        return x


def test_shared_clip_without_slot_is_skipped_with_reason():
    model = SharedClipNoSlot().eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    details = cross_layer_equalize(model)
    assert [(p["first"], p["second"]) for p in details["pairs"]] == [("c", "d")]
    assert any(s["first"] == "a" and "called at 2 places" in s["reason"] for s in details["skipped"])
    assert isinstance(model.clip, nn.ReLU6)
    _same(model(x), expected)


def test_model_without_pairs_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 1))
    with pytest.raises(AlgorithmError, match="no layer pairs to equalize"):
        cross_layer_equalize(model)
    with pytest.raises(AlgorithmError, match="no layer pairs"):
        cross_layer_equalize(nn.Linear(4, 2))


def test_bad_parameters_and_registry():
    assert list_algorithms().index("bn-fold") < list_algorithms().index("cle")
    for params, match in (({"relu6": "relu"}, "relu6 must be"), ({"iterations": 0}, "iterations"),
                          ({"beta": 1}, "unknown parameter"), ({"balance": "activations", "alpha": 2}, "alpha"),
                          ({"balance": "activations"}, "needs calibration data")):
        with pytest.raises(AlgorithmError, match=match):
            get_algorithm("cle").run(MobileBlockNet(), AlgorithmContext(params=params))


class ImbalancedDepthwise(nn.Module):
    """conv -> ReLU -> depthwise -> ReLU -> pointwise, where the first conv's output channels span 3 decades
    (the depthwise weights undo it): per-tensor INT8 of the depthwise input crushes the small channels."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 8, 1)
        self.relu = nn.ReLU()
        n = 16
        factors = 10 ** ((torch.rand(n, generator=g) - 0.5) * 3)
        with torch.no_grad():
            self.stem.weight.mul_(factors[:, None, None, None])
            self.stem.bias.mul_(factors)
            self.dw.weight.div_(factors[:, None, None, None])
        self.eval()

    def forward(self, x):
        return self.pw(self.relu(self.dw(self.relu(self.stem(x)))))


def _int8_error(model, algorithms, data, params=None):
    quantized = copy.deepcopy(model)
    config = int8_config("max").replace(algorithms=algorithms, algorithm_params=params or {})

    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    quantlab.quantize(quantized, config, forward_loop=loop)
    with torch.no_grad():
        return sum(float((quantized(x) - model(x)).pow(2).mean()) for x in data) / len(data)


def test_cle_lowers_int8_error_end_to_end():
    model = ImbalancedDepthwise()
    g = torch.Generator().manual_seed(6)
    data = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]
    plain = _int8_error(model, (), data)
    equalized = _int8_error(model, ("cle",), data)
    assert equalized < plain / 4, (plain, equalized)
    balanced = _int8_error(model, ("cle",), data, {"cle": {"balance": "activations"}})
    assert balanced < plain / 4, (plain, balanced)


def test_activation_balance_equalizes_measured_ranges_exactly():
    model = MobileBlockNet(relu6_shared=True)
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(4, 3, 12, 12, generator=g) * 2 for _ in range(3)]
    expected = [model(x) for x in data]

    def loop(m):
        for x in data:
            m(x)

    details = get_algorithm("cle").run(model, AlgorithmContext(forward_loop=loop, params={"balance": "activations"}))
    assert details["balance"] == "activations" and details["converged"]
    for x, y in zip(data, expected):
        _same(model(x), y)
    # the depthwise layer's input channels now all peak at the same value (alpha = 1 before a depthwise conv)
    seen = []
    handle = model.dw.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().amax(dim=(0, 2, 3))))
    loop(model)
    handle.remove()
    peaks = torch.stack(seen).amax(0)
    live = peaks[peaks > 0]
    assert float(live.max() / live.min()) < 1.001


def test_running_cle_twice_keeps_the_function():
    model = MobileBlockNet(relu6_shared=True)
    x = torch.randn(3, 3, 12, 12)
    expected = model(x)
    cross_layer_equalize(model)
    second = cross_layer_equalize(model)
    assert "bn_fold" not in second and second["sweeps"] <= 2  # already equalized
    _same(model(x), expected)
