"""Shared fixtures of the QAT tests: small real Fashion-MNIST subsets."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture(scope="session")
def fmnist_small():
    """(train TensorDataset of 1,024 images, list of 4 test batches of 64)."""
    from quantlab.data import load_fmnist

    x, y = load_fmnist("train[:1024]")
    tx, ty = load_fmnist("test[:256]")
    test = [(tx[i : i + 64], ty[i : i + 64]) for i in range(0, 256, 64)]
    return TensorDataset(x, y), test


@pytest.fixture()
def calib_loader(fmnist_small):
    train, _ = fmnist_small
    return DataLoader(torch.utils.data.Subset(train, range(256)), batch_size=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one intra-op thread, and the DDP tests start two processes
    on a 2-core machine: avoid oversubscribing it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
