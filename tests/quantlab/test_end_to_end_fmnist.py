"""End to end on real Fashion-MNIST: the demo CNN, PTQ with every calibrator."""
import pytest
import torch

import quantlab as ql
from quantlab.data import load_fmnist
from quantlab.models import pretrained_fmnist_cnn
from quantlab.ptq import run_ptq


def top1(model, images, labels, batch=500):
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
    return 100.0 * correct / len(images)


@pytest.fixture(scope="module")
def fmnist():
    calib_x, calib_y = load_fmnist("calib")
    test_x, test_y = load_fmnist("test")
    return (calib_x, calib_y), (test_x, test_y)


def test_ptq_on_real_fashion_mnist(fmnist, capsys):
    """All four calibrators from one pass, scored on the 10,000 test images.

    Measured (2026-11-25, demo weights fmnist_cnn_v2): FP32 92.0, max/percentile/mse within
    0.1 point, entropy about 11 points lower. TensorRT's KL method (entropy) clips 12.7% of the
    values entering ``down1``: Fashion-MNIST's constant background turns into one constant
    activation per channel after Conv+BN+ReLU, and those spikes make KL prefer a threshold just
    past them. tests/calibrators proves the calibrator equals the reference algorithm, so this is
    the method's behaviour on this data, not a bug; the test pins the loss for the other three.
    """
    (calib_x, calib_y), (test_x, test_y) = fmnist
    model = pretrained_fmnist_cnn()
    fp32 = top1(model, test_x, test_y)
    assert fp32 >= 90.0
    loader = [(calib_x[i : i + 128], calib_y[i : i + 128]) for i in range(0, len(calib_x), 128)]
    result = run_ptq(model, loader, "all")
    accuracy = {}
    for name, scales in result.scales.items():
        ql.load_scales(model, scales)
        accuracy[name] = top1(model, test_x, test_y)
    with capsys.disabled():
        print(f"\nFashion-MNIST top-1 (10,000 test images): FP32 {fp32:.2f} | " + " | ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    for name in ("max", "percentile", "mse"):
        assert fp32 - accuracy[name] <= 1.0, (name, accuracy)
    assert fp32 - max(accuracy.values()) <= 0.5
    assert 50.0 < accuracy["entropy"] < fp32 + 0.5  # runs and stays a classifier; see docstring
