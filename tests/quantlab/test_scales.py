"""Scales artifact: round trip, re-calibration without data, and bad files."""
import json

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.errors import ScalesFormatError, ScalesMismatchError


def small_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def calibrated(model=None, calibrator="entropy"):
    model = model or small_model()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    ql.quantize(model, ql.int8_config(calibrator), forward_loop=lambda m: [m(b) for b in batches])
    return model, batches


def test_round_trip_restores_outputs(tmp_path):
    model, batches = calibrated()
    scales = ql.calibrate(model, "percentile", percentile=99.9)
    path = scales.save(tmp_path / "scales.json")
    data = json.loads(path.read_text())
    assert data["format"] == "quantlab.scales" and data["version"] == 1
    assert data["calibrator"] == {"name": "percentile", "params": {"percentile": 99.9}}
    entry = next(q for q in data["quantizers"] if q["role"] == "weight" and q["module"] == "0")
    assert len(entry["amax"]) == 4 and entry["axis"] == 0 and entry["narrow_range"] is True
    other = small_model()
    with torch.no_grad():
        for (_, p_src), (_, p_dst) in zip(_float_params(model), _float_params(other)):
            p_dst.copy_(p_src)
    ql.load_scales(other, path)
    assert torch.equal(other(batches[0]), model(batches[0]))


def _float_params(model):
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
            out += [(name + ".w", w), (name + ".b", module.bias)]
    return out


def test_statistics_saved_and_recalibration_matches_live_calibration(tmp_path):
    model, _ = calibrated()
    live = {c: ql.calibrate(model, c) for c in ("max", "entropy", "mse")}
    loaded = ql.Scales.load(live["max"].save(tmp_path / "s.json"))
    assert set(loaded.statistics) == {"0", "3"}
    for c in ("entropy", "mse"):
        re = loaded.recalibrate(c)
        for e in re.entries:
            assert e.amax == live[c].get(e.module, e.role).amax


def test_mismatched_model_lists_every_problem(tmp_path):
    model, _ = calibrated()
    path = ql.calibrate(model, "max").save(tmp_path / "scales.json")
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5), nn.Linear(5, 2))
    with pytest.raises(ScalesMismatchError) as err:
        ql.load_scales(other, path)
    msg = str(err.value)
    assert "'0:weight'" in msg and "(8,)" in msg and "'4:weight' has no scale" in msg
    assert not ql.is_quantized(other)  # nothing half-applied


def test_missing_scale_for_quantized_layer(tmp_path):
    model, _ = calibrated()
    scales = ql.calibrate(model, "max")
    scales.entries = [e for e in scales.entries if e.key != "3:weight"]
    with pytest.raises(ScalesMismatchError, match="'3:weight' has no scale"):
        ql.load_scales(calibrated()[0], scales)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "quantlab.scales", "version": 1, "quantizers": [', "corrupt or truncated JSON"),
        ("[1, 2]", "not a quantlab scales file"),
        ('{"format": "quantlab.scales", "version": 99, "quantizers": []}', "unsupported scales version"),
        ('{"format": "quantlab.scales", "version": 1, "quantizers": []}', "no quantizers"),
        ('{"format": "quantlab.scales", "version": 1, "quantizers": [{"module": "0"}]}', r"quantizers\[0\]: role is missing"),
        ('{"format": "quantlab.scales", "version": 1, "quantizers": [{"module": "0", "role": "input", "amax": -1}]}', "amax must be >= 0"),
    ],
)
def test_bad_scales_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ScalesFormatError, match=message) as err:
        ql.Scales.load(path)
    assert str(path) in str(err.value)
    model = small_model()
    with pytest.raises(ScalesFormatError):
        ql.load_scales(model, path)
    assert not ql.is_quantized(model)


def test_truncated_real_file(tmp_path):
    model, _ = calibrated()
    good = ql.calibrate(model, "max").save(tmp_path / "good.json").read_bytes()
    bad = tmp_path / "truncated.json"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ScalesFormatError, match="truncated"):
        ql.Scales.load(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x80\x81\xff" * 10)
    with pytest.raises(ScalesFormatError, match="not a text"):
        ql.Scales.load(binary)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model, _ = calibrated()
    scales = ql.calibrate(model, "max")
    target = tmp_path / "scales.json"
    target.write_text("previous")
    scales.entries[0] = ql.QuantizerScale(module="0", role="input", amax=float("nan"))
    with pytest.raises(ValueError):
        scales.save(target)  # NaN is not JSON: nothing half-written, old file intact
    assert target.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [target]


def test_float_layers_round_trip_and_strictness(tmp_path):
    model, batches = calibrated()
    mixed = ql.calibrate(model, "max").without_layers(["3"])
    assert mixed.float_layers == ["3"] and all(e.module != "3" for e in mixed.entries)
    path = mixed.save(tmp_path / "mixed.json")
    fresh, _ = calibrated()
    ql.load_scales(fresh, path)
    modes = {r.key: r.quantizer.mode for r in ql.iter_quantizers(fresh)}
    assert modes["3:input"] is ql.QuantizerMode.OFF and modes["3:weight"] is ql.QuantizerMode.OFF
    assert modes["0:weight"] is ql.QuantizerMode.QUANTIZE
    assert ql.current_scales(fresh).float_layers == ["3"]
    bad = ql.Scales.load(path)
    bad.float_layers = ["does.not.exist"]
    with pytest.raises(ScalesMismatchError, match="float layer 'does.not.exist'"):
        ql.load_scales(calibrated()[0], bad)
