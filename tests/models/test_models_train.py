"""The generic training loop."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantlab.models import TrainProgress, train_classifier


def test_train_classifier_learns_and_reports():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)
    reports = []
    losses = train_classifier(model, loader, epochs=4, lr=0.1, progress=reports.append, report_every=5,
                              channels_last=True)
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(isinstance(r, TrainProgress) for r in reports)
    assert reports[-1].step == reports[-1].total_steps == 32
    assert not model.training
    assert model[0].weight.is_contiguous()  # channels_last undone for saving
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9
