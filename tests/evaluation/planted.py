"""A small MLP with one planted bad layer, for fast sensitivity / mixed-precision tests.

``bad`` receives an activation with one outlier channel (about 1000x the
others): ``fc1``'s row 0 is scaled up and ``bad``'s column 0 scaled down by the
same factor, so the FP32 function is unchanged, but ``bad``'s per-tensor INT8
input range is set by the outlier and crushes every other channel to zero.
"""
import torch
from torch import nn

OUTLIER = 1000.0


class PlantedMLP(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act1 = nn.ReLU()
        self.bad = nn.Linear(hidden, hidden)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden, hidden)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.act3(self.fc3(self.act2(self.bad(self.act1(self.fc1(x)))))))


def planted_model(seed: int = 0) -> PlantedMLP:
    torch.manual_seed(seed)
    model = PlantedMLP().eval()
    with torch.no_grad():
        model.fc1.weight[0] *= OUTLIER
        model.fc1.bias[0] = abs(model.fc1.bias[0]) * OUTLIER + OUTLIER  # channel 0 always active and huge
        model.bad.weight[:, 0] /= OUTLIER
    return model


def planted_data(model: nn.Module, *, batches: int, batch_size: int = 128, seed: int = 1):
    """Random inputs labelled with the FP32 model's own predictions (FP32 top-1 = 100%)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(batches):
            x = torch.randn(batch_size, 16, generator=g)
            out.append((x, model(x).argmax(1)))
    return out
