"""Small nets with the structures the transforms must handle (shared by the algorithm tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SamePadConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward (pads, then F.conv2d), like EfficientNet's Conv2dStaticSamePadding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pad = self.kernel_size[0] // 2
        self.static_padding = nn.ZeroPad2d(pad) if pad else nn.Identity()

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def randomize_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=generator) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.3)
    return model


def spread_channels(layer: nn.Module, generator: torch.Generator, decades: float = 3.0) -> None:
    """Multiplies each output channel of ``layer`` by 10^u, u uniform in [-decades/2, decades/2]."""
    n = layer.weight.shape[0]
    factors = 10 ** ((torch.rand(n, generator=generator) - 0.5) * decades)
    with torch.no_grad():
        layer.weight.mul_(factors.reshape([-1] + [1] * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            layer.bias.mul_(factors)


class MobileBlockNet(nn.Module):
    """stem (subclass) -> BN -> ReLU6 (shared) -> depthwise -> BN -> ReLU6 (shared) -> pointwise -> BN
    -> ReLU -> global pool -> flatten -> Linear -> BN1d -> ReLU -> Linear."""

    def __init__(self, seed: int = 0, relu6_shared: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = SamePadConv2d(3, 8, 3, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = SamePadConv2d(8, 8, 3, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.act2 = self.act if relu6_shared else nn.ReLU6()
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.bn3 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)
        randomize_bn(self, g)
        spread_channels(self.dw, g)
        spread_channels(self.fc1, g)
        self.eval()

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        x = self.act2(self.bn1(self.dw(x)))
        x = self.relu(self.bn2(self.pw(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(self.relu(self.bn3(self.fc1(x))))
