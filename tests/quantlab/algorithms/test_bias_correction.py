"""Empirical bias correction (quantlab.algorithms.bias_correction)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.algorithms import AlgorithmContext, AlgorithmError, Stage, get_algorithm, run_stage
from quantlab.batching import forward_loop
from quantlab.pipeline.refine import refinable_state, restore_refinable_state
from quantlab.pipeline.run import run


def depthwise_net() -> nn.Module:
    """Stem, depthwise (no bias) with channels of very different magnitudes, pointwise, pool, linear (no bias)."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10, bias=False),
    )
    with torch.no_grad():  # per-tensor weight scale set by the largest channel: the small ones round coarsely
        net[2].weight.mul_(torch.logspace(-2, 0, 8).view(8, 1, 1, 1))
    return net.eval()


def batches(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 3, 10, 10, generator=g) + 0.5 for _ in range(n)]


PER_TENSOR = ql.int8_config(per_channel_weights=False)


def quantized(model: nn.Module, data, algorithms=(), params=None, calibrators=("max",)):
    config = dataclasses.replace(PER_TENSOR, algorithms=tuple(algorithms), algorithm_params=params or {})
    result = run(model, forward_loop(data), list(calibrators), config=config)
    return model, result


def layer_means(model: nn.Module, data, names) -> dict:
    """Per-output-channel mean of each named layer's output over ``data``."""
    sums, counts = {}, {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def hook(module, args, out, name=name):
            dims = [0] + list(range(2, out.dim()))
            sums[name] = sums.get(name, 0) + out.double().sum(dims)
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[1]
        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in names}


@pytest.mark.parametrize("mode", ["empirical", "weights"])
def test_bias_correction_reduces_the_mean_output_error(mode):
    fp32 = depthwise_net()
    calib, held_out = batches(4, seed=0), batches(4, seed=1)
    plain, _ = quantized(copy.deepcopy(fp32), calib)
    corrected, result = quantized(copy.deepcopy(fp32), calib, ("bias-correction",), {"bias-correction": {"mode": mode}})

    def mean_error(model, data):
        with torch.no_grad():
            return float(torch.stack([(model(x) - fp32(x)).mean(0) for x in data]).mean(0).abs().mean())

    for data in (calib, held_out):
        assert mean_error(corrected, data) < 0.5 * mean_error(plain, data)
    details = result.refinements["max"][0].details
    assert details["mode"] == mode and details["corrected"] == 4 and not details["skipped"]
    created = {entry["layer"]: entry["bias_created"] for entry in details["layers"]}
    assert created == {"0": False, "2": True, "4": False, "8": True}
    assert all(entry["correction_norm"] > 0 for entry in details["layers"])
    assert details["passes"] == (1 if mode == "weights" else 5)


def test_empirical_mode_matches_every_layers_fp32_mean_on_the_calibration_data():
    fp32 = depthwise_net()
    calib = batches(3)
    model, _ = quantized(copy.deepcopy(fp32), calib, ("bias-correction",))
    names = ["0", "2", "4", "8"]
    reference = layer_means(fp32, calib, names)
    plain, _ = quantized(copy.deepcopy(fp32), calib)
    before = layer_means(plain, calib, names)
    after = layer_means(model, calib, names)
    for name in names:
        gap_before = (before[name] - reference[name]).abs().max()
        gap_after = (after[name] - reference[name]).abs().max()
        # Later corrections do not move earlier layers: every layer ends matching its FP32 mean.
        assert gap_after <= 1e-5 * reference[name].abs().max() + 1e-7, name
        assert gap_before > 100 * gap_after, name


def test_weights_mode_adds_the_weight_error_times_the_mean_quantized_input():
    torch.manual_seed(1)
    fp32 = nn.Sequential(nn.Linear(6, 5)).eval()
    data = [torch.randn(16, 6) + 1.0 for _ in range(3)]
    model = copy.deepcopy(fp32)
    config = PER_TENSOR
    run(model, forward_loop(data), ["max"], config=config)
    layer = model[0]
    weight_q = layer.weight.detach().clone()  # fake-quantized weight
    with torch.no_grad():
        x_q = torch.cat([layer.input_quantizer(x) for x in data])
    bias_before = layer.bias.detach().clone()
    run_stage(model, [get_algorithm("bias-correction")], Stage.REFINE, forward_loop=forward_loop(data),
              params={"bias-correction": {"mode": "weights"}})
    expected = (fp32[0].weight - weight_q) @ x_q.mean(0)
    torch.testing.assert_close(layer.bias.detach() - bias_before, expected.detach(), rtol=1e-4, atol=1e-7)


def test_created_biases_are_removed_when_the_pipeline_restores_the_weights():
    fp32 = depthwise_net()
    calib = batches(2)
    model = copy.deepcopy(fp32)
    config = dataclasses.replace(PER_TENSOR, algorithms=("bias-correction",))
    result = run(model, forward_loop(calib), ["max", "entropy"], config=config)
    for name in ("max", "entropy"):
        assert "2:bias" in result.refined_weights[name] and "8:bias" in result.refined_weights[name]
    # Each calibrator corrected the same FP32 weights: entropy's created bias is its own, not max's plus entropy's.
    alone = copy.deepcopy(fp32)
    single = run(alone, forward_loop(calib), ["entropy"], config=config)
    torch.testing.assert_close(result.refined_weights["entropy"]["2:bias"], single.refined_weights["entropy"]["2:bias"])
    state = refinable_state(model)
    assert set(state) == set(result.refined_weights["entropy"])
    before = {k: v for k, v in state.items() if k not in ("2:bias", "8:bias")}
    restore_refinable_state(model, before)
    assert model[2].bias is None and model[8].bias is None
    assert isinstance(model[0].bias, torch.Tensor)
    restore_refinable_state(model, result.refined_weights["max"])  # and back: the biases come back too
    assert torch.equal(model[2].bias.detach(), result.refined_weights["max"]["2:bias"])
    assert set(refinable_state(model)) == set(result.refined_weights["max"])


def test_a_layer_without_bias_whose_own_forward_might_ignore_one_is_skipped():
    class OwnForwardConv(nn.Conv2d):
        def forward(self, x):
            return nn.functional.conv2d(x, self.weight, None, self.stride, self.padding)

    net = nn.Sequential(OwnForwardConv(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    model, result = quantized(net, batches(2), ("bias-correction",))
    details = result.refinements["max"][0].details
    assert "0" in details["skipped"] and "own forward" in details["skipped"]["0"]
    assert [entry["layer"] for entry in details["layers"]] == ["2"]
    assert model[0].bias is None


@pytest.mark.parametrize("params, message", [({"mode": "analytic"}, "mode must be one of"),
                                             ({"passes": 2}, "unknown parameter")])
def test_bad_parameters_get_a_clear_error(params, message):
    with pytest.raises(AlgorithmError, match=message):
        quantized(depthwise_net(), batches(1), ("bias-correction",), {"bias-correction": params})


def test_needs_calibration_data_and_a_quantized_model():
    algorithm = get_algorithm("bias-correction")
    with pytest.raises(AlgorithmError, match="needs calibration data"):
        run_stage(depthwise_net(), [algorithm], Stage.REFINE)
    with pytest.raises(AlgorithmError, match="no layer of the model has a quantized weight"):
        algorithm.run(depthwise_net(), AlgorithmContext(forward_loop=forward_loop(batches(1))))
