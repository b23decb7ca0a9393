"""TensorRT engine build: trtexec command line and the missing-TensorRT path (tested here);
real builds only where TensorRT exists (skipped otherwise, never counted as verified here)."""
import shlex

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantlab.cli.main import main
from quantlab.runtimes.tensorrt.loader import (
    BuildOptions,
    EngineBuildError,
    TensorRTUnavailableError,
    build_engine,
    profile_shapes,
    tensorrt_available,
    trtexec_command,
)

needs_tensorrt = pytest.mark.skipif(not tensorrt_available(), reason="tensorrt is not importable here (no NVIDIA TensorRT install)")
no_tensorrt = pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed: the missing-TensorRT path cannot be exercised")


def conv_model(path, batch="batch", channels=3):
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, channels, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], name="conv0", pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 4, 16, 16])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_trtexec_command_has_profile_workspace_cache_and_tf32(tmp_path):
    onnx_path = conv_model(tmp_path / "m.onnx")
    options = BuildOptions(min_batch=1, opt_batch=8, max_batch=32, workspace_mib=2048, timing_cache="t.cache", tf32=False)
    cmd = trtexec_command(onnx_path, tmp_path / "m.plan", options)
    assert cmd[0] == "trtexec" and f"--onnx={onnx_path}" in cmd and f"--saveEngine={tmp_path / 'm.plan'}" in cmd
    assert "--minShapes=input:1x3x16x16" in cmd and "--optShapes=input:8x3x16x16" in cmd and "--maxShapes=input:32x3x16x16" in cmd
    assert "--memPoolSize=workspace:2048M" in cmd and "--timingCacheFile=t.cache" in cmd and "--noTF32" in cmd
    assert "--stronglyTyped" in cmd  # TensorRT 10.x needs it
    assert "--stronglyTyped" not in trtexec_command(onnx_path, "m.plan", options, trt_major=11)  # always on in 11
    assert not any(flag in cmd for flag in ("--int8", "--fp16", "--best"))  # removed in TensorRT 11


def test_static_batch_needs_no_shapes(tmp_path):
    cmd = trtexec_command(conv_model(tmp_path / "m.onnx", batch=4), "m.plan")
    assert not any(c.startswith("--minShapes") for c in cmd) and "--noTF32" not in cmd


def test_dynamic_non_batch_dimension_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    conv_model(path)
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(model, path)
    with pytest.raises(EngineBuildError, match="'input' has dynamic non-batch dimensions"):
        profile_shapes(path, BuildOptions())


def test_build_options_are_validated():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BuildOptions(min_batch=8, opt_batch=4, max_batch=16)
    with pytest.raises(ValueError, match="workspace"):
        BuildOptions(workspace_mib=0)


def test_cli_print_trtexec_works_without_tensorrt(tmp_path, capsys):
    onnx_path = conv_model(tmp_path / "model.int8.onnx")
    plan = tmp_path / "model.int8.plan"
    assert main(["build", str(onnx_path), "--out", str(plan), "--print-trtexec", "--no-tf32", "--max-batch", "128"]) == 0
    printed = capsys.readouterr().out.strip()
    args = shlex.split(printed)
    assert args[:3] == ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan}"]
    assert "--maxShapes=input:128x3x16x16" in args and "--noTF32" in args
    assert not plan.exists()


@no_tensorrt
def test_build_without_tensorrt_fails_clearly_and_writes_nothing(tmp_path, capsys):
    onnx_path = conv_model(tmp_path / "model.onnx")
    plan = tmp_path / "model.plan"
    with pytest.raises(TensorRTUnavailableError, match="pypi.nvidia.com"):
        build_engine(onnx_path, plan)
    assert main(["build", str(onnx_path), "--out", str(plan)]) == 1
    err = capsys.readouterr().err
    assert "quantlab build: error: TensorRT is not installed" in err and "--print-trtexec" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_checks_the_onnx_file_before_tensorrt(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    from quantlab.export.errors import OnnxFormatError

    with pytest.raises(OnnxFormatError, match="bad.onnx"):
        build_engine(bad, tmp_path / "bad.plan")
    assert not (tmp_path / "bad.plan").exists()


@needs_tensorrt
def test_real_build_with_timing_cache(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    onnx_path = conv_model(tmp_path / "m.onnx")
    options = BuildOptions(max_batch=8, opt_batch=4, timing_cache=str(tmp_path / "timing.cache"), tf32=False)
    result = build_engine(onnx_path, tmp_path / "m.plan", options)
    assert result.plan.stat().st_size > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    from quantlab.runtimes.tensorrt.runner import measure_engine_latency

    assert measure_engine_latency(result.plan, batch_size=4, iterations=10).median_ms > 0
