"""Legacy TensorRT calibration cache: format, round trip, names of the exported FP32 graph."""
import struct

import numpy as np
import onnx
import pytest

from quantlab.cli.main import main
from quantlab.export.cache import (
    CalibrationCache,
    cache_from_scales,
    hex_to_scale,
    read_calibration_cache,
    scale_to_hex,
    trt_version_number,
    write_calibration_cache,
)
from quantlab.export.errors import CacheFormatError, TensorMappingError
from quantlab.scales import QuantizerScale, Scales

# Lines as TensorRT 8.6 writes them: names with spaces, brackets, colons; short hex.
TENSORRT_WRITTEN = """TRT-8601-EntropyCalibration2
input: 3c008912
(Unnamed Layer* 3) [Convolution]_output: 3d8f5c29
/backbone/layer1/Relu_output_0: 3e1a2b3c
onnx::Conv_123: 3ca3d70a
weird:name:with:colons: 3f800000
tiny: 800000
"""


def test_known_line_decodes():
    assert hex_to_scale("3c008912") == pytest.approx(0.0078452, abs=5e-8)
    assert hex_to_scale("3c008912") * 127 == pytest.approx(0.99634, abs=1e-5)


def test_hex_is_big_endian_float32():
    for value in (0.0078452, 1.0, 3.5e-5, 12.25):
        text = scale_to_hex(value)
        assert len(text) == 8 and text == struct.pack(">f", value).hex()
        assert hex_to_scale(text) == np.float32(value)


def test_reads_a_cache_written_by_tensorrt(tmp_path):
    path = tmp_path / "trt.cache"
    path.write_text(TENSORRT_WRITTEN)
    cache = read_calibration_cache(path)
    assert (cache.version, cache.algorithm) == (8601, "EntropyCalibration2")
    assert list(cache.scales) == ["input", "(Unnamed Layer* 3) [Convolution]_output", "/backbone/layer1/Relu_output_0",
                                  "onnx::Conv_123", "weird:name:with:colons", "tiny"]
    assert cache.scales["weird:name:with:colons"] == 1.0
    # Leading zeros dropped; 0x00800000 is the smallest normal float32, the least scale accepted.
    assert cache.scales["tiny"] == struct.unpack(">f", bytes.fromhex("00800000"))[0] == np.finfo(np.float32).tiny
    assert cache.amax("input") == pytest.approx(0.0078452 * 127, rel=1e-5)


def test_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    scales = {f"/layer{i}/Relu_output_0": float(np.float32(s)) for i, s in enumerate(rng.uniform(1e-4, 0.5, 50))}
    cache = CalibrationCache(version=100300, algorithm="EntropyCalibration2", scales=scales)
    path = cache.save(tmp_path / "calib.cache")
    again = read_calibration_cache(path)
    assert again.header == "TRT-100300-EntropyCalibration2"
    assert again.scales == scales  # bit-exact float32 values, same order
    assert path.read_text() == again.to_text()


@pytest.mark.parametrize("version,expected", [("8.6.1", 8601), ("7.1.3", 7103), ("10.3.0", 100300), ("10.12", 101200), (8601, 8601), ("100300", 100300)])
def test_version_numbers(version, expected):
    assert trt_version_number(version) == expected


@pytest.mark.parametrize("version", ["10.x", "latest", "8.6.1.2.3", "8.100.1", "-1"])
def test_bad_versions_explain(version):
    with pytest.raises(ValueError, match="TensorRT version"):
        trt_version_number(version)


@pytest.mark.parametrize("content,where", [
    ("", "empty"),
    ("TRT8601EntropyCalibration2\ninput: 3c008912\n", ":1:"),
    ("TRT-8601-EntropyCalibration2\ninput 3c008912\n", ":2:"),
    ("TRT-8601-EntropyCalibration2\ninput: zz008912\n", ":2:"),
])
def test_malformed_caches_name_file_and_line(tmp_path, content, where):
    path = tmp_path / "bad.cache"
    path.write_text(content)
    with pytest.raises(CacheFormatError, match="bad.cache") as info:
        read_calibration_cache(path)
    assert where in str(info.value)


def test_binary_file_is_rejected(tmp_path):
    path = tmp_path / "plan.cache"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(CacheFormatError, match="not ASCII"):
        read_calibration_cache(path)


def _scales(*entries):
    return Scales(entries=[QuantizerScale(module=m, role="input", amax=a) for m, a in entries])


def test_cache_uses_scale_not_amax_and_merges_shared_tensors():
    scales = _scales(("a", 1.27), ("b", 2.54), ("c", 0.5))
    cache = cache_from_scales(scales, {"a:input": "t0", "b:input": "t0", "c:input": "t1"}, trt_version="8.6.1")
    assert cache.scales["t0"] == pytest.approx(0.02, rel=1e-6)  # one range per tensor: the larger
    assert cache.scales["t1"] == pytest.approx(0.5 / 127, rel=1e-6)


def test_unmapped_layers_are_named():
    with pytest.raises(TensorMappingError, match="b:input"):
        cache_from_scales(_scales(("a", 1.0), ("b", 1.0)), {"a:input": "t0"}, trt_version="8.6.1")
    cache = cache_from_scales(_scales(("a", 1.0), ("b", 1.0)), {"a:input": "t0"}, trt_version="8.6.1", strict=False)
    assert list(cache.scales) == ["t0"]


def test_tensorrt_11_has_no_calibration_cache():
    with pytest.raises(ValueError, match="removed in 11"):
        cache_from_scales(_scales(("a", 1.0)), {"a:input": "t0"}, trt_version="11.0.0")


def test_cache_names_are_tensors_of_the_exported_fp32_graph(exports, calibrated, tmp_path):
    _, scales = calibrated
    fp32 = exports["fp32"]
    path, cache = write_calibration_cache(scales, fp32.path, tmp_path / "calib.cache", trt_version="10.3.0")
    graph = onnx.load(str(fp32.path)).graph
    tensors = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    consumers = {i for n in graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[:1]}
    inputs = [e for e in scales.entries if e.role == "input"]
    assert len(cache.scales) == len({fp32.tensor_map[f"{e.module}:input"] for e in inputs}) >= 7
    assert set(cache.scales) <= tensors and set(cache.scales) <= consumers  # the data inputs of Conv/Gemm
    for entry in inputs:
        assert cache.scales[fp32.tensor_map[entry.key]] == pytest.approx(entry.amax / 127, rel=1e-6)
    assert read_calibration_cache(path).scales == cache.scales


def test_cli_cache_write_and_show(exports, calibrated, tmp_path, capsys):
    _, scales = calibrated
    scales_path = scales.save(tmp_path / "scales.json")
    out = tmp_path / "calib.cache"
    assert main(["cache", "--scales", str(scales_path), "--onnx", str(exports["fp32"].path), "--trt-version", "8.6.1", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "TRT-8601-EntropyCalibration2"
    assert main(["cache", "--show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert exports["fp32"].tensor_map["block1.conv1:input"] in shown


def test_cli_cache_for_another_model_fails_without_output(exports, tmp_path, capsys):
    other = _scales(("encoder.layer.0.query", 1.0), ("encoder.layer.0.key", 1.0)).save(tmp_path / "other.json")
    out = tmp_path / "calib.cache"
    code = main(["cache", "--scales", str(other), "--onnx", str(exports["fp32"].path), "--trt-version", "8.6.1", "--out", str(out)])
    assert code == 1 and not out.exists()
    assert "encoder.layer.0.query:input" in capsys.readouterr().err


def test_cli_cache_rejects_non_onnx(tmp_path, capsys, calibrated):
    scales_path = calibrated[1].save(tmp_path / "scales.json")
    fake = tmp_path / "model.onnx"
    fake.write_text("not onnx")
    out = tmp_path / "calib.cache"
    assert main(["cache", "--scales", str(scales_path), "--onnx", str(fake), "--trt-version", "8.6.1", "--out", str(out)]) == 1
    assert "model.onnx" in capsys.readouterr().err and not out.exists()
