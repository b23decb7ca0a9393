"""TensorRTRunner: a clear error without TensorRT; real runs only where TensorRT and a GPU exist."""
import pytest

from quantlab.runtimes.tensorrt.loader import TensorRTUnavailableError, tensorrt_available
from quantlab.runtimes.tensorrt.runner import TensorRTRunner

needs_tensorrt = pytest.mark.skipif(not tensorrt_available(), reason="tensorrt is not importable here (no NVIDIA TensorRT install)")


def test_missing_plan_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.plan"):
        TensorRTRunner(tmp_path / "nothing.plan")


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")
def test_without_tensorrt_the_error_says_how_to_install(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00" * 16)
    with pytest.raises(TensorRTUnavailableError) as info:
        TensorRTRunner(plan)
    message = str(info.value)
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt" in message and "--print-trtexec" in message
    assert isinstance(info.value, ImportError)  # callers catching ImportError keep working


@needs_tensorrt
def test_runs_a_built_engine(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    from quantlab.runtimes.tensorrt.loader import build_engine
    from quantlab.export.float import export_float

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    onnx_path = export_float(model, tmp_path / "m.onnx", x).path
    plan = build_engine(onnx_path, tmp_path / "m.plan").plan
    with TensorRTRunner(plan) as runner:
        out = runner.run(x.numpy())[0]
    assert abs(out - model(x).detach().numpy()).max() < 1e-2
