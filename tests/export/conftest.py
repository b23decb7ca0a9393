"""Session fixtures: the cached demo CNN, calibrated once, exported once per form."""
import copy

import pytest

import quantlab as ql
from quantlab.data import load_fmnist
from quantlab.models import pretrained_fmnist_cnn


@pytest.fixture(scope="session")
def fp32_model():
    return pretrained_fmnist_cnn().eval()


@pytest.fixture(scope="session")
def test_set():
    """The 1,000 first Fashion-MNIST test images (float32, normalized) and labels."""
    images, labels = load_fmnist("test[:1000]")
    return images, labels


@pytest.fixture(scope="session")
def full_test_set():
    return load_fmnist("test")


@pytest.fixture(scope="session")
def calibrated(fp32_model):
    """(model, scales): percentile (99.99) PTQ of a copy of the demo CNN on 512 calibration images."""
    images, _ = load_fmnist("calib[:512]")
    model = copy.deepcopy(fp32_model)
    batches = [images[i : i + 128] for i in range(0, len(images), 128)]
    ql.quantize(model, ql.int8_config("percentile"), forward_loop=lambda m: [m(b) for b in batches])
    scales = ql.current_scales(model, calibrator="percentile")
    return model.eval(), scales


@pytest.fixture(scope="session")
def exports(tmp_path_factory, calibrated, fp32_model, test_set):
    """Every export of the demo CNN, made once: int8 (tensorrt, ort-cpu, and without the
    placement pass: a mirror of the PyTorch model), fp32, fp16."""
    from quantlab.export.float import export_float
    from quantlab.export.qdq import export_int8

    model, _ = calibrated
    out = tmp_path_factory.mktemp("exports")
    example = test_set[0][:2]
    return {
        "int8": export_int8(model, out / "model.int8.onnx", example),
        "int8_ort": export_int8(model, out / "model.int8.ort.onnx", example, target="ort-cpu"),
        "int8_mirror": export_int8(model, out / "model.int8.mirror.onnx", example, placement=False),
        "fp32": export_float(fp32_model, out / "model.fp32.onnx", example),
        "fp16": export_float(fp32_model, out / "model.fp16.onnx", example, precision="fp16"),
    }


@pytest.fixture(scope="session")
def torch_reference(calibrated, test_set):
    """Logits of the PyTorch fake-quantized model on the 1,000 test images (computed once)."""
    from tests.export.helpers import torch_logits

    return torch_logits(calibrated[0], test_set[0])
