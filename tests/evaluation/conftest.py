"""Fixtures for the evaluation tests: real Fashion-MNIST, the demo CNN, a planted-outlier MLP."""
import pytest
import torch

from tests.evaluation.planted import planted_data, planted_model


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_model():
    from quantlab.models import pretrained_fmnist_cnn

    return pretrained_fmnist_cnn()


@pytest.fixture(scope="session")
def fmnist_batches():
    """(calibration batches, eval batches): 256 calibration images, 1,000 test images."""
    from quantlab.data import load_fmnist

    cx, cy = load_fmnist("calib[:256]")
    tx, ty = load_fmnist("test[:1000]")
    calib = [(cx[i : i + 128], cy[i : i + 128]) for i in range(0, len(cx), 128)]
    evaluation = [(tx[i : i + 250], ty[i : i + 250]) for i in range(0, len(tx), 250)]
    return calib, evaluation


@pytest.fixture()
def planted():
    model = planted_model()
    return model, planted_data(model, batches=2, seed=1), planted_data(model, batches=8, seed=2)
