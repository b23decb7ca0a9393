"""Class 1 of issue 15: values that must not be accepted are refused, by one validator, everywhere."""
import copy
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.cli.main import main
from quantlab.errors import FileFormatError, ScalesFormatError, ScalesMismatchError
from quantlab.jobs.runs import RunFolderError, load_run_info
from quantlab.export.cache import CalibrationCache, read_calibration_cache, write_calibration_cache
from quantlab.export.errors import CacheFormatError, OnnxFormatError
from quantlab.export.mapping import METADATA_KEY, read_tensor_map, set_metadata
from quantlab.scales import Scales
from quantlab.validation import nesting_depth, parse_json_text
from tests.export.graphs import GraphBuilder

MODEL = "tests/qat/models.py:tiny_cnn"


def _calibrated(calibrator="max"):
    from tests.qat.models import tiny_cnn

    model = tiny_cnn().eval()
    batches = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(b) for b in batches])
    return model, ql.calibrate(model, calibrator)


@pytest.fixture(scope="module")
def scales_doc():
    _, scales = _calibrated()
    return scales.to_dict()


def _entry(doc, key):
    return next(q for q in doc["quantizers"] if f"{q['module']}:{q['role']}" == key)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _entry(d, "stem.0:input").update(amax=0.0), "amax is 0, which quantizes every activation to 0"),
        (lambda d: _entry(d, "stem.0:input").update(amax=1e308), "does not fit float32"),
        (lambda d: _entry(d, "stem.0:input").update(amax=True), "must be a number, got a boolean"),
        (lambda d: _entry(d, "stem.0:input").update(amax="1.0"), "must be a number, got a string"),
        (lambda d: _entry(d, "stem.0:input").update(num_bits=0), "num_bits 0 is not supported"),
        (lambda d: _entry(d, "stem.0:input").update(num_bits=64), "num_bits 64 is not supported"),
        (lambda d: _entry(d, "stem.0:input").update(num_bits=8.0), "num_bits must be an integer"),
        (lambda d: _entry(d, "fc:weight").update(amax=[]), "must not be empty"),
        (lambda d: _entry(d, "fc:weight")["amax"].__setitem__(0, -1.0), r"channel 0\]: amax must be >= 0"),
        (lambda d: _entry(d, "fc:weight").update(narrow_range="yes"), "narrow_range must be true or false"),
        (lambda d: d["quantizers"].append(dict(_entry(d, "fc:weight"))), "appears twice"),
        (lambda d: d.update(version=True), "unsupported scales version"),
        (lambda d: d["statistics"]["stem.0"].update(bin_width=0), "bin_width must be > 0"),
        (lambda d: d["statistics"]["stem.0"].update(num_bins=10**9), "num_bins must be <="),
        (lambda d: d["statistics"]["stem.0"]["counts"].__setitem__(0, 10**30), r"counts\[0\] must be an integer"),
        # The config's fields were taken as they came (7.5 bits, "no" as a true per_channel, "abc" as three patterns).
        (lambda d: d["config"]["weight"].update(num_bits=7.5), "config: weight: num_bits must be an integer"),
        (lambda d: d["config"]["weight"].update(per_channel="no"), "config: weight: per_channel must be true or false"),
        (lambda d: d["config"].update(include="abc"), "config: include must be a list"),
        (lambda d: d["config"].update(num_bins=10**12), "config: num_bins must be <="),
        (lambda d: d["config"].update(algorithms=[3]), r"config: algorithms\[0\] must be a string"),
        (lambda d: d["config"].update(algorithm_params={"adaround": {"lr": [1, "x", {"y": 10**400}]}}),
         r"config: algorithm_params\['adaround'\]\['lr'\]\[2\]\['y'\] must be a finite number"),
    ],
)
def test_bad_values_in_a_scales_file_are_refused_naming_the_field(tmp_path, scales_doc, mutate, message):
    doc = copy.deepcopy(scales_doc)
    mutate(doc)
    path = tmp_path / "scales.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ScalesFormatError, match=message) as err:
        Scales.load(path)
    assert str(path) in str(err.value)


def test_a_compare_run_json_with_a_bad_quant_config_is_refused():
    from quantlab.validation import check_run_info

    with pytest.raises(FileFormatError, match="run.json: quant_config: input: must be an object, got a string"):
        check_run_info({"metric": "top1", "quant_config": {"input": "x"}}, "run.json")
    check_run_info({"metric": "top1", "quant_config": ql.int8_config().to_dict()}, "run.json")


@pytest.mark.parametrize("document, check, message", [
    ({"metric": "top1", "calibrators": ["x/../../evil"]}, "check_run_info", r"calibrators\[0\] must be a name"),
    ({"rows": [{"precision": "int8", "metric": "top1", "calibrator": "max", "source": "ptq/../../x"}]}, "check_results",
     r"rows\[0\]: source must be a name"),
    ({"best_calibrator": ".."}, "check_results", "best_calibrator must be a name"),
])
def test_run_file_names_from_a_run_folder_cannot_leave_it(document, check, message):
    # autoprecision wrote autoprecision.<calibrator>/ from these: "x/../../evil" put it beside the run folder.
    from quantlab import validation

    with pytest.raises(FileFormatError, match=message):
        getattr(validation, check)(document, "run.json")


def test_pathological_json_is_refused_before_parsing(tmp_path):
    deep = "[" * 400_000 + "]" * 400_000
    assert nesting_depth(deep) == 400_000
    path = tmp_path / "deep.json"
    path.write_text(deep)
    with pytest.raises(ScalesFormatError, match="nested 400000 levels deep"):
        Scales.load(path)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(deep)
    with pytest.raises(RunFolderError, match="nested"):
        load_run_info(folder)
    # Brackets inside strings do not count; duplicate keys and NaN are refused.
    assert nesting_depth(json.dumps({"a": "[[[[[[["})) == 1
    with pytest.raises(FileFormatError, match="appears twice"):
        parse_json_text('{"a": 1, "a": 2}', "x")
    with pytest.raises(FileFormatError, match="NaN is not a JSON number"):
        parse_json_text('{"a": NaN}', "x")


def test_file_size_is_bounded_before_reading(tmp_path, monkeypatch):
    import quantlab.scales as scales_module

    _, scales = _calibrated()
    path = scales.save(tmp_path / "s.json")
    monkeypatch.setattr(scales_module, "MAX_SCALES_BYTES", 100)
    with pytest.raises(ScalesFormatError, match="larger than any scales file"):
        Scales.load(path)


def test_zero_input_range_stays_in_float_and_never_reaches_a_cache(tmp_path):
    """A layer whose calibration saw only zeros keeps floating-point inputs (and is said so);
    the scales file, the Q/DQ export and the cache never hold a zero scale."""

    class DeadBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * 0.0) + self.a(x)[:, :2]  # b only ever sees zeros

    torch.manual_seed(0)
    model = DeadBranch().eval()
    data = [torch.randn(8, 4) for _ in range(2)]
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(x) for x in data])
    with pytest.warns(UserWarning, match="saw only zeros at their input.*: b"):
        scales = ql.calibrate(model, "max")
    keys = {e.key for e in scales.entries}
    assert "b:input" not in keys and {"b:weight", "a:input", "a:weight"} <= keys
    again = Scales.load(scales.save(tmp_path / "s.json"))  # written and read back
    fresh = DeadBranch().eval()
    fresh.load_state_dict(model.state_dict(), strict=False)
    ql.load_scales(fresh, again)  # loads: the missing input scale is the documented float-input case
    # The cache writer computes scales as the exporter does and refuses a zero one.
    with pytest.raises(CacheFormatError, match="not > 0"):
        CalibrationCache(version=8601, algorithm="EntropyCalibration2", scales={"t": 0.0}).save(tmp_path / "c.cache")
    assert not (tmp_path / "c.cache").exists()


def test_zero_weight_range_on_live_weights_is_a_mismatch():
    model, scales = _calibrated()
    entry = next(e for e in scales.entries if e.key == "fc:weight")
    zeroed = list(entry.amax)
    zeroed[3] = 0.0
    bad = Scales(entries=[e if e.key != "fc:weight" else type(e)(**{**e.__dict__, "amax": zeroed}) for e in scales.entries],
                 config=scales.config)
    from tests.qat.models import tiny_cnn

    with pytest.raises(ScalesMismatchError, match=r"'fc:weight': amax 0 for channel\(s\) 3 whose weights are not zero"):
        ql.load_scales(tiny_cnn().eval(), bad)


def test_check_fails_on_degenerate_scales_in_graphs_and_caches(tmp_path, capsys):
    for value, rule in ((0.0, "scale-not-positive"), (1e-40, "scale-subnormal"), (float("nan"), "scale-not-positive")):
        b = GraphBuilder()
        out = b.node("Conv", [b.qdq("input", scale=value, name="x"), b.weight_dq()], pads=[1, 1, 1, 1])
        path = tmp_path / f"m{rule}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx.save(b.model(["input"], [out]), path)
        assert main(["check", str(path)]) == 1
        assert rule in capsys.readouterr().out
    cache = tmp_path / "zero.cache"
    cache.write_text("TRT-8601-EntropyCalibration2\ninput: 3c008912\nconv_out: 00000000\n")
    assert main(["check", str(cache)]) == 1
    assert "zero.cache:3" in capsys.readouterr().out
    with pytest.raises(CacheFormatError, match=r"zero.cache:3: 'conv_out': scale 0.0 is not > 0"):
        read_calibration_cache(cache)
    cache.write_text("TRT-8601-EntropyCalibration2\ninput: 3c008912\n")
    assert main(["check", str(cache)]) == 0


def test_invalid_tensor_map_metadata_is_an_error_not_a_silent_fallback(tmp_path):
    b = GraphBuilder()
    model = b.model(["input"], [b.conv("input")])
    for value, message in (("[" * 100 + "]" * 100, "nested"), ('{"conv": "x"}', "is not '<module>:input'"),
                           ('{"conv:input": 3}', "must be a non-empty string"), ("{", "corrupt")):
        set_metadata(model, {METADATA_KEY: value})
        with pytest.raises(OnnxFormatError, match=message):
            read_tensor_map(model)
    from quantlab.export.check import check_model, findings_for

    assert findings_for(check_model(model), "invalid-metadata")


def test_cli_export_and_cache_refuse_a_zero_amax_file(tmp_path, scales_doc, capsys, monkeypatch):
    monkeypatch.delenv("QUANTLAB_STORE", raising=False)
    doc = copy.deepcopy(scales_doc)
    _entry(doc, "stem.0:input")["amax"] = 0.0
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", MODEL, "--scales", str(path), "--input-shape", "1,28,28", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "amax is 0" in err and not out.exists()
    with pytest.raises(ScalesFormatError, match="amax is 0"):
        write_calibration_cache(path, tmp_path / "absent.onnx", tmp_path / "c.cache", trt_version="8.6.1")
