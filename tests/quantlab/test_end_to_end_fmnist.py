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


def test_entropy_ptq_within_one_point_of_fp32(fmnist, capsys):
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
    assert fp32 - accuracy["entropy"] <= 1.0
    assert all(fp32 - a <= 3.0 for a in accuracy.values()), accuracy
