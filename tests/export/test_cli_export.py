"""`quantlab export` end to end (in-process), including bad input."""
import json

import onnx
import pytest

from quantlab.cli.main import main
from quantlab.scales import QuantizerScale, Scales

MODEL = "quantlab.models:pretrained_fmnist_cnn"


@pytest.fixture(scope="module")
def scales_file(calibrated, tmp_path_factory):
    return calibrated[1].save(tmp_path_factory.mktemp("scales") / "scales.percentile.json")


def test_export_int8_from_scales_file(scales_file, tmp_path, capsys):
    out = tmp_path / "model.int8.onnx"
    store = tmp_path / "runs.sqlite"
    code = main(["export", "--model", MODEL, "--scales", str(scales_file), "--input-shape", "1,28,28",
                 "--out", str(out), "--store", str(store)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "check: 0 error(s), 0 warning(s); 8/8 weighted ops quantized" in printed
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    sidecar = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert sidecar["target"] == "tensorrt" and "block1.conv1:input" in sidecar["tensor_map"]
    from quantlab.store import RunStore

    (run,) = RunStore(store).list_runs(kind="export")
    assert run["status"] == "done"
    assert {a["kind"] for a in RunStore(store).artifacts(run["id"])} >= {"onnx"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_float_with_data_example(precision, tmp_path):
    out = tmp_path / f"model.{precision}.onnx"
    assert main(["export", "--model", MODEL, "--precision", precision, "--data", "fmnist:test[:4]", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / f"model.{precision}.onnx.json").is_file()


def test_int8_needs_scales(tmp_path, capsys):
    assert main(["export", "--model", MODEL, "--input-shape", "1,28,28", "--out", str(tmp_path / "m.onnx")]) == 1
    assert "--scales" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scales_of_another_model_fail_cleanly(tmp_path, capsys):
    other = Scales(entries=[QuantizerScale("encoder.layer.0.attention.query", "input", 1.0),
                            QuantizerScale("encoder.layer.0.attention.query", "weight", [0.5] * 4, narrow_range=True, axis=0)])
    path = other.save(tmp_path / "bert.scales.json")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", MODEL, "--scales", str(path), "--input-shape", "1,28,28", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "encoder.layer.0.attention.query" in err and "stem.0" in err
    assert not out.exists() and not (tmp_path / "m.onnx.json").exists()


def test_scales_missing_a_layer_fail_cleanly(calibrated, tmp_path, capsys):
    scales = calibrated[1]
    partial = Scales(entries=[e for e in scales.entries if e.module != "block2.conv2"], config=scales.config)
    path = partial.save(tmp_path / "partial.json")
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", MODEL, "--scales", str(path), "--input-shape", "1,28,28", "--out", str(out)]) == 1
    assert "block2.conv2:weight" in capsys.readouterr().err and not out.exists()


def test_corrupt_scales_file(tmp_path, capsys):
    path = tmp_path / "scales.json"
    path.write_text('{"format": "quantlab.scales", "version": 1, "quantizers": [')
    assert main(["export", "--model", MODEL, "--scales", str(path), "--input-shape", "1,28,28", "--out", str(tmp_path / "m.onnx")]) == 1
    assert "scales.json" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_bad_input_shape(scales_file, tmp_path, capsys):
    assert main(["export", "--model", MODEL, "--scales", str(scales_file), "--input-shape", "1,x,28", "--out", str(tmp_path / "m.onnx")]) == 1
    assert "--input-shape" in capsys.readouterr().err


def test_export_ort_cpu_with_a_forced_form_shows_and_records_it(scales_file, tmp_path, capsys):
    from quantlab.store import RunStore

    out, store = tmp_path / "model.ort.onnx", tmp_path / "runs.sqlite"
    assert main(["export", "--model", MODEL, "--scales", str(scales_file), "--input-shape", "1,28,28", "--out", str(out),
                 "--target", "ort-cpu", "--ort-int8", "u8u8", "--store", str(store)]) == 0
    assert "ort-cpu INT8 form: u8u8 (forced) on " in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["quantlab.ort_int8"] == "u8u8" and meta["quantlab.ort_int8.requested"] == "u8u8"
    (exported,) = RunStore(store).list_runs(kind="export")
    assert exported["config"]["ort_int8"] == "u8u8" and exported["config"]["ort_int8_requested"] == "u8u8"

    main(["check", str(out)])
    assert "ONNX Runtime INT8 form: u8u8 (forced; chosen on" in capsys.readouterr().out
    assert main(["check", str(out), "--json"]) == 1  # UINT8 inside the network: not a TensorRT file
    assert json.loads(capsys.readouterr().out)["ort_int8"]["form"] == "u8u8"

    assert main(["run", str(out), "--data", "fmnist:test[:64]", "--store", str(store)]) == 0
    printed = capsys.readouterr().out
    assert "ORT INT8 form" in printed and "QLinearConv u8u8" in printed and "exact on this CPU" in printed
    ran = next(r for r in RunStore(store).list_runs(kind="export") if r["id"] != exported["id"])
    assert ran["config"]["ort_int8"] == "u8u8"


def test_ort_int8_applies_to_the_ort_cpu_target_only(scales_file, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", MODEL, "--scales", str(scales_file), "--input-shape", "1,28,28", "--out", str(out),
                 "--ort-int8", "u8u8"]) == 1
    assert "--ort-int8 / --ort-reduce-range apply to --target ort-cpu only" in capsys.readouterr().err and not out.exists()
