"""forward_loop: runs the batches and says beforehand how many it will run when it can."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from quantlab.batching import forward_loop


def test_expected_batches_from_the_data_length_and_max_batches():
    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.zeros(10)), batch_size=4)
    assert forward_loop(loader).expected_batches == 3
    assert forward_loop(loader, max_batches=2).expected_batches == 2
    assert forward_loop(loader, max_batches=9).expected_batches == 3
    assert forward_loop(b for b in loader).expected_batches is None  # a generator has no length
    model = nn.Linear(3, 2)
    assert forward_loop(loader, max_batches=2)(model) == 2
    assert forward_loop(loader)(model) == forward_loop(loader).expected_batches
