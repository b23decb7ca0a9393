"""The user verbs: quantize / calibrate on the same statistics, and bad input."""
import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.calibrators import UnknownCalibratorError
from quantlab.errors import CalibrationError, ConfigError, NonFiniteActivationError


def model_and_data():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, [torch.randn(16, 6) for _ in range(4)]


def test_all_calibrators_from_one_statistics_pass():
    model, data = model_and_data()
    calls = {"n": 0}

    def loop(m):
        calls["n"] += 1
        for x in data:
            m(x)

    ql.quantize(model, ql.int8_config(), forward_loop=loop)
    amaxes = {c: ql.calibrate(model, c).get("2", "input").amax for c in ql.list_calibrators()}
    assert calls["n"] == 1
    assert set(amaxes) >= {"max", "percentile", "entropy", "mse"}
    with ql.quantization_disabled(model), torch.no_grad():
        assert amaxes["max"] == max(torch.relu(model[0](x)).max().item() for x in data)
    assert all(0 < a <= amaxes["max"] for a in amaxes.values())


def test_calibrate_leaves_model_quantizing_with_chosen_ranges():
    model, data = model_and_data()
    ql.quantize(model, forward_loop=lambda m: [m(x) for x in data])
    scales = ql.calibrate(model, "max")
    for ref in ql.iter_quantizers(model):
        assert ref.quantizer.mode is ql.QuantizerMode.QUANTIZE
        if ref.role == "input":
            assert ref.quantizer.amax.item() == scales.get(ref.module_name, "input").amax


def test_unknown_calibrator_lists_known_ones():
    model, data = model_and_data()
    ql.quantize(model, forward_loop=lambda m: [m(x) for x in data])
    with pytest.raises(UnknownCalibratorError, match="registered calibrators: .*entropy.*max"):
        ql.calibrate(model, "kl-magic")


def test_empty_calibration_data():
    model, _ = model_and_data()
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        ql.quantize(model, forward_loop=lambda m: None)


def test_calibrate_before_any_statistics():
    model, _ = model_and_data()
    ql.quantize(model)
    with pytest.raises(CalibrationError, match="no statistics"):
        ql.calibrate(model, "max")


def test_nan_activation_names_the_module():
    model, data = model_and_data()
    with torch.no_grad():
        model[2].bias.fill_(0)
    bad = data[0].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"input of '0'"):
        ql.quantize(model, forward_loop=lambda m: m(bad))


def test_unreached_layer_warns_and_stays_float():
    class Partial(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Partial()
    with pytest.warns(UserWarning, match="unused"):
        ql.quantize(model, forward_loop=lambda m: m(torch.randn(2, 3)))
    assert model.unused.input_quantizer.mode is ql.QuantizerMode.OFF


def test_config_round_trip_and_validation():
    cfg = ql.int8_config("percentile", exclude=("head",), percentile=99.9)
    assert ql.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        ql.QuantConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="per tensor"):
        ql.QuantConfig(input=ql.QuantizerSpec(per_channel=True))
    with pytest.raises(ConfigError, match="newer"):
        ql.QuantConfig.from_dict({"version": 99})


def test_quantize_keeps_model_device_and_preset_is_fresh():
    assert ql.int8_config() is not ql.int8_config() and ql.int8_config() == ql.int8_config()
    model, data = model_and_data()
    ql.quantize(model, forward_loop=lambda m: [m(x) for x in data])
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_nan_in_weights_names_the_layer_and_a_bad_calibrator_result_names_the_tensor(monkeypatch):
    from quantlab.calibrators import base as registry
    model, data = model_and_data()
    ql.quantize(model, forward_loop=lambda m: [m(x) for x in data])
    with torch.no_grad():
        model[2].parametrizations.weight.original[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match="weights of '2' contain NaN"):
        ql.calibrate(model, "max")
    model, data = model_and_data()
    ql.quantize(model, forward_loop=lambda m: [m(x) for x in data])
    monkeypatch.setitem(registry._REGISTRY, "always_nan", lambda *args, **kwargs: float("nan"))
    with pytest.raises(CalibrationError, match="'always_nan' chose amax nan for the input of '0'"):
        ql.calibrate(model, "always_nan")


def test_later_calibrators_keep_the_weight_ranges():
    from quantlab.pipeline import apply, choose, scales_of, statistics_of

    model, data = model_and_data()
    ql.quantize(model, forward_loop=lambda m: [m(x) for x in data])
    first = ql.calibrate(model, "max")
    with torch.no_grad():
        model[0].parametrizations.weight.original.mul_(2)  # changed weights are NOT re-read...
    ranges = choose(statistics_of(model), "entropy")
    apply(model, ranges, weights=False)
    kept = scales_of(model)
    assert kept.get("0", "weight").amax == first.get("0", "weight").amax
    apply(model, ranges)  # ...unless asked
    redone = scales_of(model)
    assert redone.get("0", "weight").amax == [2 * a for a in first.get("0", "weight").amax]


def test_run_ptq_scales_are_what_the_quantizers_hold():
    """run_ptq records each calibrator's ranges from the values it stored (no read-back): the
    same floats as reading the model's float32 buffers, weights per channel included."""
    from quantlab.pipeline import apply, choose, scales_of, statistics_of
    from quantlab.ptq import run_ptq

    torch.manual_seed(3)
    model, data = model_and_data()
    result = run_ptq(model, data, ["mse", "percentile", "entropy"])
    statistics = statistics_of(model)
    for name, recorded in result.scales.items():
        stored: dict = {}
        apply(model, choose(statistics, name), stored=stored)
        assert {k: type(v) for k, v in stored.items()} == {"0:input": float, "0:weight": list, "2:input": float,
                                                          "2:weight": list}
        read = scales_of(model)  # every range read back from the buffers
        assert [(e.module, e.role, e.amax) for e in recorded.entries] == [(e.module, e.role, e.amax) for e in read.entries]
        assert scales_of(model, held=stored).entries == read.entries
    # 1/3 is not a float32: the recorded value is the buffer's rounding of it, not the double.
    stored = {}
    apply(model, ql.pipeline.types.Ranges(calibrator="x", params={}, inputs={"0": 1 / 3, "2": 0.5}), stored=stored)
    assert stored["0:input"] == model[0].input_quantizer.amax.item() != 1 / 3


def test_the_pass_runs_in_eval_mode_and_restores_every_flag():
    from quantlab.pipeline import collect

    class Frozen(nn.BatchNorm1d):
        calls = []

        def train(self, mode=True):  # an override: the pass must go through model.eval() to honour it
            Frozen.calls.append(mode)
            return super().train(mode)

    for bn_type in (nn.BatchNorm1d, Frozen):
        model = nn.Sequential(nn.Linear(6, 8), bn_type(8), nn.ReLU(), nn.Linear(8, 3))
        ql.quantize(model, ql.int8_config())
        model[3].eval()  # a caller's own mix of modes
        flags = {name: m.training for name, m in model.named_modules()}
        before = model[1].running_mean.clone()
        seen = []
        collect(model, lambda m: (seen.append([x.training for x in m.modules()]), m(torch.randn(16, 6))))
        assert not any(seen[0])  # every module in eval mode during the pass
        assert torch.equal(model[1].running_mean, before)  # so BatchNorm kept its statistics
        assert {name: m.training for name, m in model.named_modules()} == flags
    assert Frozen.calls and Frozen.calls[0] is False


class WithIdleLayers(nn.Module):
    """One layer every batch reaches, one that sees only zeros, one never called."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.zeros, self.unused = nn.Linear(4, 2), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))), self.zeros(torch.zeros(x.shape[0], 4))


def test_calibrators_not_left_in_the_model_get_the_scales_applying_them_gives(monkeypatch):
    """run_ptq builds the Scales of the calibrators between the first and the last from their ranges, without
    storing them in the quantizers: the same Scales as applying each (unreached and all-zero inputs included)."""
    import importlib

    from quantlab.pipeline import apply, choose, scales_of, statistics_of

    pipeline_run = importlib.import_module("quantlab.pipeline.run")  # the module (the package exports its function)
    built = []
    planned = pipeline_run.planned_scales
    monkeypatch.setattr(pipeline_run, "planned_scales", lambda *a, **k: built.append(planned(*a, **k)) or built[-1])
    from quantlab.ptq import run_ptq

    torch.manual_seed(5)
    model = WithIdleLayers()
    names = ["max", "percentile", "entropy", "mse"]
    with pytest.warns(UserWarning, match="only zeros|no calibration data"):
        result = run_ptq(model, [torch.randn(16, 6) for _ in range(3)], names)
    assert len(built) == 2 and all(s is not None for s in built)  # the two in the middle
    statistics = statistics_of(model)
    for name in names:
        ranges = choose(statistics, name)
        with pytest.warns(UserWarning):
            apply(model, ranges)
        applied = scales_of(model, calibrator=name, calibrator_params=ranges.params, statistics=statistics.saved())
        recorded = result.scales[name]
        assert recorded.entries == applied.entries and {e.module for e in recorded.entries} == {"a", "b", "zeros", "unused"}
        assert not any(e.role == "input" and e.module in ("zeros", "unused") for e in recorded.entries)
        for field in ("calibrator", "calibrator_params", "float_layers", "config", "model", "algorithms"):
            assert getattr(recorded, field) == getattr(applied, field), field
        assert recorded.statistics.keys() == applied.statistics.keys() == {"a", "b"}


def test_a_calibrator_in_the_middle_of_a_run_that_chooses_nan_is_reported(monkeypatch):
    from quantlab.calibrators import base as registry
    from quantlab.ptq import run_ptq

    monkeypatch.setitem(registry._REGISTRY, "always_nan", lambda *args, **kwargs: float("nan"))
    model, data = model_and_data()
    with pytest.raises(CalibrationError, match="'always_nan' chose amax nan for the input of '0'"):
        run_ptq(model, data, ["max", "always_nan", "entropy"])
