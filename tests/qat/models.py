"""Tiny models for the QAT tests (also CLI factories: ``tests/qat/models.py:tiny_cnn``)."""
import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv+BN+ReLU, a depthwise conv+BN, a residual add, dropout, Linear head (28x28 inputs)."""

    def __init__(self, classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.dw_bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.dw_bn(self.dw(x)) + x)
        x = torch.relu(self.pw_bn(self.pw(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


def tiny_cnn_dropout() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(dropout=0.2)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model
