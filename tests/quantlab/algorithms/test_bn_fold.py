"""bn-fold: exact folds into Conv/Linear (subclasses too), reasons for every BatchNorm left."""
import copy

import pytest
import torch
from torch import nn

from quantlab.algorithms import AlgorithmError, get_algorithm, parse_algorithms
from quantlab.algorithms.bn_fold import bn_scale_shift, fold_batchnorms
from quantlab.attach import attach_quantizers
from quantlab.config import int8_config

from tests.quantlab.algorithms.nets import MobileBlockNet, SamePadConv2d, randomize_bn


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_folds_every_bn_exactly_including_conv_subclass_and_linear():
    model = MobileBlockNet()
    x = torch.randn(4, 3, 12, 12)
    expected = model(x)
    details = fold_batchnorms(model)
    assert details["method"] == "fx"
    assert {(f["layer"], f["batchnorm"]) for f in details["folded"]} == {
        ("stem", "bn0"), ("dw", "bn1"), ("pw", "bn2"), ("fc1", "bn3")}
    assert details["not_folded"] == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.stem, SamePadConv2d) and model.stem.bias is not None  # the subclass got a bias
    _same(model(x), expected)


def test_scale_shift_is_the_inference_batchnorm():
    bn = randomize_bn(nn.BatchNorm1d(6), torch.Generator().manual_seed(1)).eval()
    x = torch.randn(5, 6)
    scale, shift = bn_scale_shift(bn)
    _same(x * scale + shift, bn(x))


class Branchy(nn.Module):
    """conv output read twice (BN cannot fold), a BN fed by an add, a shared BN."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn_sum = nn.BatchNorm2d(4)
        g = torch.Generator().manual_seed(2)
        randomize_bn(self, g)
        self.eval()

    def forward(self, x):
        a = self.a(x)
        y = self.bn_a(a) + a  # a is read twice
        return self.bn_sum(y + self.b(x))


def test_reports_why_a_batchnorm_stays():
    model = Branchy()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    details = get_algorithm("bn-fold").run(model, _context())
    reasons = {d["batchnorm"]: d["reason"] for d in details["not_folded"]}
    assert details["folded"] == []
    assert "also used elsewhere" in reasons["bn_a"]
    assert "not a module's output" in reasons["bn_sum"] or "not a Conv" in reasons["bn_sum"]
    _same(model(x), expected)


class Untraceable(nn.Module):
    """Data-dependent control flow (fx fails): only the plain Sequential's pairs fold."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 4, 1)
        self.head_bn = nn.BatchNorm2d(4)
        randomize_bn(self, torch.Generator().manual_seed(3))
        self.eval()

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:
            x = x * 2
        return self.head_bn(self.head(x))


def test_untraceable_model_folds_only_provable_sequential_pairs():
    model = Untraceable()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    details = fold_batchnorms(model)
    assert details["method"] == "sequential" and details["trace_error"]
    assert details["folded"] == [{"layer": "body.0", "batchnorm": "body.1"}]
    assert [d["batchnorm"] for d in details["not_folded"]] == ["head_bn"]
    _same(model(x), expected)


def test_quantized_model_is_refused():
    model = MobileBlockNet()
    attach_quantizers(model, int8_config())
    with pytest.raises(AlgorithmError, match="before quantizers"):
        fold_batchnorms(model)


def test_unknown_algorithm_names_the_known_ones():
    with pytest.raises(AlgorithmError) as info:
        parse_algorithms("cle,bn-fold,nonsense")
    message = str(info.value)
    assert "nonsense" in message and "cle" in message and "bn-fold" in message


def test_parameters_are_checked():
    with pytest.raises(AlgorithmError, match="no parameters"):
        get_algorithm("bn-fold").run(MobileBlockNet(), _context(params={"eps": 1}))


def _context(params=None):
    from quantlab.algorithms import AlgorithmContext

    return AlgorithmContext(params=dict(params or {}))


def test_int8_config_takes_algorithms_and_their_parameters():
    from quantlab.config import int8_config

    config = int8_config(algorithms=("bn-fold", "adaround"), algorithm_params={"adaround": {"iterations": 5}})
    assert config.algorithms == ("bn-fold", "adaround")
    assert config.params_of("adaround") == {"iterations": 5}
    assert dict(config.calibrator_params) == {}  # not swallowed as calibrator parameters
