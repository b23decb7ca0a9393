"""The calibration cache's header names TensorRT's reading calibrator, not quantlab's: said in the
cache metadata, the CLI help and `quantlab cache --show`."""
import json

from quantlab.cli.main import main
from quantlab.export.cache import header_note, read_calibration_cache, write_calibration_cache


def test_cache_metadata_names_the_calibrator_and_explains_the_header(calibrated, exports, tmp_path):
    _, scales = calibrated  # percentile scales
    path, cache = write_calibration_cache(scales, exports["fp32"].path, tmp_path / "calibration.cache", trt_version="10.3.0")
    assert read_calibration_cache(path).algorithm == "EntropyCalibration2"
    meta = json.loads((tmp_path / "calibration.cache.json").read_text())
    assert meta["format"] == "quantlab.calibration_cache" and meta["header"] == cache.header == "TRT-100300-EntropyCalibration2"
    assert meta["scales_from"]["calibrator"] == "percentile" == scales.calibrator
    assert meta["scales_from"]["calibrator_params"] == scales.calibrator_params
    assert meta["note"] == header_note("EntropyCalibration2", "percentile")
    assert "takes the scales as they are" in meta["note"] and "percentile" in meta["note"]
    # Written again over itself: the cache and its metadata are replaced, not refused.
    write_calibration_cache(scales, exports["fp32"].path, tmp_path / "calibration.cache", trt_version="10.3.0")


def test_cli_help_and_show_explain_the_header(calibrated, exports, tmp_path, capsys):
    _, scales = calibrated
    scales_file = scales.save(tmp_path / "scales.percentile.json")
    try:
        main(["cache", "--help"])
    except SystemExit:
        pass
    help_text = " ".join(capsys.readouterr().out.split())
    assert "does not say how the scales were chosen" in help_text and "not how the scales were chosen" in help_text
    out = tmp_path / "c.cache"
    assert main(["cache", "--scales", str(scales_file), "--onnx", str(exports["fp32"].path), "--trt-version", "8.6.1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"metadata {out}.json" in text and "came from quantlab's percentile calibrator" in text
    assert main(["cache", "--show", str(out)]) == 0
    assert "came from quantlab's percentile calibrator" in capsys.readouterr().out
    assert main(["check", str(out)]) == 0
    assert "came from quantlab's percentile calibrator" in capsys.readouterr().out


def test_a_sidecar_path_that_is_another_file_is_refused_before_writing(calibrated, exports, tmp_path):
    import pytest

    from quantlab.outputs import OutputPathError

    _, scales = calibrated
    (tmp_path / "c.cache.json").write_text("{\"mine\": 1}")
    with pytest.raises(OutputPathError):
        write_calibration_cache(scales, exports["fp32"].path, tmp_path / "c.cache", trt_version="10.3.0")
    assert not (tmp_path / "c.cache").exists() and (tmp_path / "c.cache.json").read_text() == "{\"mine\": 1}"
