"""The runner interface: PyTorch and ONNX Runtime on real Fashion-MNIST; TensorRT's clear absence."""
import numpy as np
import pytest
import torch

from quantlab.cli.main import main
from quantlab.data import load_fmnist
from quantlab.export.errors import OnnxFormatError
from quantlab.export.float import export_float
from quantlab.models import pretrained_fmnist_cnn
from quantlab.runtimes import LatencyStats, OnnxRuntimeRunner, RunnerError, TorchRunner
from quantlab.runtimes.factory import open_runner


@pytest.fixture(scope="module")
def model():
    return pretrained_fmnist_cnn().eval()


@pytest.fixture(scope="module")
def images():
    return load_fmnist("test[:512]")


@pytest.fixture(scope="module")
def fp32_onnx(model, images, tmp_path_factory):
    return export_float(model, tmp_path_factory.mktemp("rt") / "model.fp32.onnx", images[0][:2]).path


def batches(images, labels, size=128):
    return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size)]


def test_torch_and_onnxruntime_agree_through_one_interface(model, images, fp32_onnx):
    x, y = images
    with TorchRunner(model) as torch_runner, OnnxRuntimeRunner(fp32_onnx, threads=2) as ort_runner:
        results = [r.run_dataset(batches(x, y), keep_outputs=True) for r in (torch_runner, ort_runner)]
        assert ort_runner.input_names == ["input"] and ort_runner.output_names == ["output"]
    a, b = results
    assert a.num_samples == b.num_samples == 512 and a.num_batches == 4
    np.testing.assert_allclose(a.outputs, b.outputs, atol=1e-4)
    assert a.top1 == b.top1 and a.top1 > 85.0
    expected = 100.0 * (torch.from_numpy(a.predictions) == y).float().mean().item()
    assert a.top1 == pytest.approx(expected)


def test_run_accepts_names_positions_and_tensors(fp32_onnx, images):
    x = images[0][:8]
    with OnnxRuntimeRunner(fp32_onnx) as runner:
        by_array = runner.run(x.numpy())[0]
        np.testing.assert_array_equal(by_array, runner.run({"input": x})[0])
        np.testing.assert_array_equal(by_array, runner.run([x])[0])
        with pytest.raises(RunnerError, match="unknown input"):
            runner.run({"pixels": x.numpy()})
        with pytest.raises(RunnerError, match="2 inputs given"):
            runner.run([x, x])
        with pytest.raises(RunnerError, match="model.fp32.onnx"):
            runner.run(np.zeros((2, 3, 28, 28), np.float32))  # wrong channel count


def test_dataset_without_labels(fp32_onnx, images):
    with OnnxRuntimeRunner(fp32_onnx) as runner:
        result = runner.run_dataset([images[0][:64], images[0][64:96]])
    assert result.top1 is None and result.num_samples == 96 and result.predictions.shape == (96,)


def test_latency_is_measured(fp32_onnx, images):
    with OnnxRuntimeRunner(fp32_onnx, threads=1) as runner:
        stats = runner.measure_latency(images[0][:16], warmup=1, iterations=5)
    assert isinstance(stats, LatencyStats) and stats.batch_size == 16 and stats.iterations == 5
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms and stats.samples_per_second > 0


def test_onnxruntime_runner_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(OnnxFormatError, match="junk.onnx"):
        OnnxRuntimeRunner(junk)


def test_factory_picks_the_backend(fp32_onnx, tmp_path):
    runner = open_runner(fp32_onnx)
    assert runner.backend == "onnxruntime"
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real plan")
    try:
        import tensorrt  # noqa: F401
    except Exception:
        from quantlab.runtimes.tensorrt.loader import TensorRTUnavailableError

        with pytest.raises(TensorRTUnavailableError, match="pip install --extra-index-url https://pypi.nvidia.com tensorrt"):
            open_runner(plan)
    with pytest.raises(RunnerError, match="unknown backend"):
        open_runner(fp32_onnx, backend="openvino")


def test_cli_run_reports_accuracy_and_kernels(fp32_onnx, capsys, tmp_path):
    store = tmp_path / "runs.sqlite"
    assert main(["run", str(fp32_onnx), "--data", "fmnist:test[:256]", "--threads", "2", "--latency", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "top-1 (%)" in out and "none (runs in float)" in out and "median latency, batch 64" in out
    from quantlab.store import RunStore

    (run,) = RunStore(store).list_runs(kind="export")
    metrics = {r["metric"]: r["value"] for r in RunStore(store).results(run["id"])}
    assert metrics["top1"] > 85.0 and metrics["latency_ms_b64"] > 0


def test_cli_run_rejects_truncated_onnx(fp32_onnx, tmp_path, capsys):
    data = fp32_onnx.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 3])
    assert main(["run", str(cut), "--data", "fmnist:test[:64]"]) == 1
    assert "cut.onnx" in capsys.readouterr().err
