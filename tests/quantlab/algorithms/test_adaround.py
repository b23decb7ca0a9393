"""AdaRound (quantlab.algorithms.adaround): rounding within {floor, ceil}, exact grid
weights that the weight quantizer reproduces, a falling reconstruction loss, clear
errors, and the pipeline's per-calibrator refinement."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.algorithms import AlgorithmContext, AlgorithmError, get_algorithm
from quantlab.algorithms._layers import quantized_layers
from quantlab.algorithms.adaround import DEFAULTS, LayerRounding, _reconstruct, beta_at
from quantlab.attach import original_weight
from quantlab.batching import forward_loop
from quantlab.config import QuantConfig
from quantlab.functional import amax_of_weight, scale_from_amax
from quantlab.pipeline.refine import refinable_state
from quantlab.pipeline.run import run

FAST = {"iterations": 150, "lr": 0.01, "batch_size": 16, "max_samples": 64}


def small_net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.Conv2d(8, 12, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )
    with torch.no_grad():
        net[2].weight.mul_(torch.logspace(-1.5, 0, 8).view(8, 1, 1, 1))
    return net.eval()


def batches(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def config_with(algorithms, params=None, *, bits: int = 8, per_channel: bool = True) -> QuantConfig:
    base = ql.int8_config(per_channel_weights=per_channel)
    weight = dataclasses.replace(base.weight, num_bits=bits)
    params = params or ({"adaround": FAST} if "adaround" in algorithms else {})
    return dataclasses.replace(base, weight=weight, algorithms=tuple(algorithms), algorithm_params=params)


@pytest.mark.parametrize("per_channel", [True, False])
def test_rounding_stays_within_floor_and_ceil_and_the_quantizer_reproduces_the_weights(per_channel):
    fp32 = small_net()
    model = copy.deepcopy(fp32)
    result = run(model, forward_loop(batches()), ["max"], config=config_with(("adaround",), per_channel=per_channel))
    details = result.refinements["max"][0].details
    assert details["rounded"] == 4 and not details["skipped"]
    flipped_somewhere = False
    for layer in quantized_layers(model):
        before = dict(fp32.named_modules())[layer.name].weight.detach()
        after = layer.weight.detach()
        quantizer = layer.weight_quantizer
        scale = scale_from_amax(quantizer.amax, quantizer.spec)
        if per_channel:
            scale = scale.view([-1] + [1] * (before.dim() - 1))
        # The range measured again from the rounded weights is the one they were rounded on.
        assert torch.equal(quantizer.amax, amax_of_weight(before, quantizer.spec))
        scaled = before * torch.reciprocal(scale)
        codes = torch.round(after * torch.reciprocal(scale))
        assert bool(((codes == torch.floor(scaled)) | (codes == torch.ceil(scaled))).all()), layer.name
        flipped_somewhere |= bool((codes != torch.round(scaled)).any())
        # Grid weights: the weight quantizer (the exported Q/DQ) rounds them to themselves.
        on_grid = torch.round(scaled).abs() < quantizer.spec.bound
        assert torch.equal(layer.module.weight.detach()[on_grid], after[on_grid]), layer.name
        assert torch.equal(after[~on_grid], before[~on_grid])  # the range-defining weights stay as they were
    assert flipped_somewhere  # it did learn something other than round-to-nearest


def test_the_reconstruction_loss_falls_with_4_bit_weights():
    fp32 = small_net()
    model = copy.deepcopy(fp32)
    data = [10 * x for x in batches()]  # activations large enough for the reconstruction to outweigh the regularizer
    result = run(model, forward_loop(data), ["max"], config=config_with(("adaround",), bits=4))
    layers = result.refinements["max"][0].details["layers"]
    assert [entry["layer"] for entry in layers] == ["0", "2", "4", "8"]
    kept = [entry["loss_adaround"] if entry["kept"] == "adaround" else entry["loss_nearest"] for entry in layers]
    assert all(k <= entry["loss_nearest"] for k, entry in zip(kept, layers))
    gains = sorted(k / entry["loss_nearest"] for k, entry in zip(kept, layers))
    assert gains[0] < 0.7 and gains[1] < 0.9, gains


def test_the_regularizer_decides_every_rounding_by_the_end():
    torch.manual_seed(0)
    rounding = LayerRounding(torch.randn(6, 4), torch.full((6,), 0.05), 0, -127, 127, 127)
    optimizer = torch.optim.Adam([rounding.v], lr=0.05)
    params = dict(DEFAULTS, iterations=400)
    for iteration in range(400):
        beta = beta_at(iteration, params)
        if beta is None:
            continue
        loss = rounding.regularizer(beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    h = rounding.h()
    assert bool(((h == 0) | (h == 1)).all())
    # With nothing else to minimise, the regularizer alone gives round-to-nearest.
    assert torch.equal(rounding.codes(hard=True), rounding.nearest)
    assert beta_at(0, params) is None and beta_at(80, params) == pytest.approx(20.0) and beta_at(399, params) == pytest.approx(2.0, abs=1e-3)


def test_starts_at_round_to_nearest():
    weight = torch.randn(5, 7)
    scale = torch.full((5,), 0.03)
    rounding = LayerRounding(weight, scale, 0, -127, 127, 127)
    scaled = weight * torch.reciprocal(scale.view(-1, 1))
    torch.testing.assert_close(rounding.h(), scaled - torch.floor(scaled), atol=1e-5, rtol=0)
    assert torch.equal(rounding.codes(hard=True), rounding.nearest)


def test_nan_during_reconstruction_names_the_layer():
    model = copy.deepcopy(small_net())
    run(model, forward_loop(batches()), ["max"], config=config_with(()))
    layer = quantized_layers(model)[1]
    inputs = torch.randn(8, 8, 8, 8)
    targets = torch.full((8, 8, 8, 8), float("nan"))
    with pytest.raises(AlgorithmError, match="NaN or Inf in the reconstruction of layer '2'"):
        _reconstruct(layer, inputs, targets, dict(DEFAULTS, **FAST), torch.Generator().manual_seed(0))


def test_overflow_in_a_later_layer_names_it_and_leaves_the_weights_as_they_were():
    fp32 = small_net()
    with torch.no_grad():
        fp32[8].weight.fill_(3e38)  # its FP32 outputs overflow to Inf
    model = copy.deepcopy(fp32)
    run(model, forward_loop(batches()), ["max"], config=config_with(()))
    before = refinable_state(model)
    algorithm = get_algorithm("adaround")
    context = AlgorithmContext(forward_loop=forward_loop(batches()), params=FAST)
    with pytest.raises(AlgorithmError, match="layer '8'"):
        algorithm.run(model, context)
    after = refinable_state(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("params, message", [({"iterations": 0}, "positive integer"), ({"lr": "fast"}, "must be a number"), ({"lr": -1.0}, "positive number"),
                                             ({"warm_start": 1.5}, "below 1"), ({"steps": 3}, "unknown parameter")])
def test_bad_parameters_get_a_clear_error(params, message):
    with pytest.raises(AlgorithmError, match=message):
        run(small_net(), forward_loop(batches(1)), ["max"], config=config_with(("adaround",), {"adaround": params}))


def test_pipeline_refines_each_calibrator_from_the_same_weights_and_ends_with_the_last():
    fp32 = small_net()
    data = batches()
    config = config_with(("bias-correction", "adaround"), {"adaround": FAST})
    calibrators = ["max", "entropy"]
    model = copy.deepcopy(fp32)
    result = run(model, forward_loop(data), calibrators, config=config)
    for name in calibrators:
        assert [r.name for r in result.refinements[name]] == ["adaround", "bias-correction"]
        assert "2:bias" in result.refined_weights[name]  # created by bias correction
    # Other activation ranges, other refinements.
    assert not torch.equal(result.refined_weights["max"]["2:bias"], result.refined_weights["entropy"]["2:bias"])
    # The model holds the last calibrator's refined weights.
    final = refinable_state(model)
    assert set(final) == set(result.refined_weights["entropy"])
    assert all(torch.equal(final[k], result.refined_weights["entropy"][k]) for k in final)
    # Each calibrator started from the FP32 weights: the same as refining with it alone.
    for name in ("entropy",):
        alone = run(copy.deepcopy(fp32), forward_loop(data), [name], config=config)
        for key, value in alone.refined_weights[name].items():
            torch.testing.assert_close(result.refined_weights[name][key], value, rtol=0, atol=1e-6, msg=key)
    # The scales saved for a calibrator reproduce its refined model: the weight ranges are the rounded weights' own.
    for layer in quantized_layers(model):
        amax = torch.tensor(result.scales["entropy"].as_dict()[f"{layer.name}:weight"].amax)
        assert torch.equal(amax, amax_of_weight(original_weight(layer.module), layer.weight_quantizer.spec))


def test_the_qdq_export_carries_the_learned_rounding_and_the_created_biases(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from quantlab.export.qdq import export_int8

    fp32 = small_net()
    data = batches()
    model = copy.deepcopy(fp32)
    run(model, forward_loop(data), ["max"], config=config_with(("adaround", "bias-correction")))
    plain = copy.deepcopy(fp32)
    run(plain, forward_loop(data), ["max"], config=config_with(()))
    path = tmp_path / "refined.int8.onnx"
    export_int8(model, path, data[0][:2], sidecar=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[1]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected, unrefined = model(x), plain(x)
    # Float ops in ORT's Q/DQ graph: the refined fake-quant model, within float summation order.
    gap = float((torch.from_numpy(got) - expected).abs().max())
    assert gap < 1e-4 * float(expected.abs().max()) + 1e-5
    assert float((unrefined - expected).abs().max()) > 100 * gap  # the refinements are in the file


def test_fp32_outputs_cached_ahead_give_the_same_rounding_as_one_pass_per_layer():
    fp32 = small_net()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(4)]  # 64 samples of 8 x 32 x 32 floats: 2 MiB a layer
    model = copy.deepcopy(fp32)
    run(model, forward_loop(data), ["max"], config=config_with(()))
    per_layer = copy.deepcopy(model)
    algorithm = get_algorithm("adaround")
    ahead = algorithm.run(model, AlgorithmContext(forward_loop=forward_loop(data), params=FAST))
    alone = algorithm.run(per_layer, AlgorithmContext(forward_loop=forward_loop(data), params=dict(FAST, target_cache_mb=1)))
    assert ahead["passes"] == {"fp32": 1, "quantized": 4, "fp32_outputs_cached_ahead": True}
    assert alone["passes"]["fp32"] == 4  # a conv's outputs alone exceed 1 MiB: no window holds two layers
    before, after = refinable_state(model), refinable_state(per_layer)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert [r["loss_adaround"] for r in ahead["layers"]] == [r["loss_adaround"] for r in alone["layers"]]


def test_a_loop_whose_batches_change_between_passes_still_pairs_inputs_with_their_targets():
    from quantlab.algorithms._adaround_data import LayerData
    from quantlab.algorithms._layers import execution_order, reference_of

    data = batches(4)
    calls = [0]

    def rotating(model):  # each pass starts at another batch, like a shuffling loader
        calls[0] += 1
        for i in range(len(data)):
            model(data[(i + calls[0]) % len(data)])

    model = copy.deepcopy(small_net())
    run(model, forward_loop(data), ["max"], config=config_with(()))
    layers = quantized_layers(model)
    context = AlgorithmContext(forward_loop=rotating)
    reference = reference_of(model, layers, context)
    order, _ = execution_order(model, layers, context)
    layer_data = LayerData(model, layers, order, reference, context, 32, {l.name: 1024 for l in layers}, 1 << 20, "adaround")
    x, y = layer_data.take(order[1])
    assert layer_data.paired_only and layer_data.fp32_passes == 2  # the cached pass's batches were not the inputs'
    with torch.no_grad():  # the targets are the FP32 layer's outputs on (the FP32 version of) these very inputs
        expected = torch.nn.functional.conv2d(x, reference["2:weight"], None, padding=1, groups=8)
    gap = float((expected - y).abs().max() / y.abs().max())
    assert gap < 0.05, gap


def test_leaves_no_gradient_on_the_model():
    model = copy.deepcopy(small_net())
    run(model, forward_loop(batches()), ["max"], config=config_with(("adaround",), {"adaround": dict(FAST, iterations=10)}))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("scale", [1.0, 3.7])
def test_the_channel_squared_error_has_the_plain_expressions_value_and_gradient_bit_for_bit(scale):
    from quantlab.algorithms.adaround import ChannelSquaredError

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=g)
    x, y = torch.randn(4, 3, 10, 10, generator=g), torch.randn(4, 8, 8, 8, generator=g)
    plain, fused = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = (torch.nn.functional.conv2d(x, plain) - y).pow(2).sum(1).mean()
    got = ChannelSquaredError.apply(torch.nn.functional.conv2d(x, fused), y, 1)
    (scale * expected).backward()
    (scale * got).backward()
    assert torch.equal(got, expected)
    assert torch.equal(fused.grad, plain.grad)
