"""AdaRound on CUDA: the optimization replayed as a CUDA graph learns the eager loop's
rounding, a capture that fails falls back to the eager loop (and leaves the device's
random numbers usable), and a NaN is still reported naming the layer."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import quantlab as ql
from quantlab.algorithms import AlgorithmContext, AlgorithmError, get_algorithm
from quantlab.algorithms._adaround_loop import NonFinite, batch_indices, optimize
from quantlab.algorithms._layers import quantized_layers
from quantlab.algorithms.adaround import DEFAULTS, _reconstruct, beta_at
from quantlab.batching import forward_loop
from quantlab.functional import scale_from_amax
from quantlab.pipeline.run import run
from tests.quantlab.algorithms.test_adaround_loop import PARAMS as LOOP_PARAMS
from tests.quantlab.algorithms.test_adaround_loop import layer_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PARAMS = {"iterations": 300, "batch_size": 16, "max_samples": 128}
# Graph and eager loops differ by float rounding (Adam's capturable arithmetic, the warm start's
# regularizer times 0, cuDNN's algorithms): a weight whose h(V) ends near 1/2 may round the other way.
MAX_DIFFERENT_CODES = 0.01


class SyncingConv2d(nn.Conv2d):
    """A conv whose forward reads a value back to the host (as some models' checks do): a CUDA
    graph cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(x).any()):
            raise ValueError("NaN input")
        return super().forward(x)


def conv_net(syncing: bool = False) -> nn.Module:
    torch.manual_seed(0)
    conv = SyncingConv2d if syncing else nn.Conv2d
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        conv(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )
    with torch.no_grad():
        net[2].weight.mul_(torch.logspace(-1.5, 0, 16).view(16, 1, 1, 1))
    return net.eval().cuda()


def batches(n: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    return [(3 * torch.randn(16, 3, 16, 16, generator=g)).cuda() for _ in range(n)]


def quantized(net: nn.Module, data) -> nn.Module:
    base = ql.int8_config(per_channel_weights=True)
    config = dataclasses.replace(base, weight=dataclasses.replace(base.weight, num_bits=4))
    run(net, forward_loop(data), ["max"], config=config)
    return net


def codes(model: nn.Module) -> dict:
    out = {}
    for layer in quantized_layers(model):
        q = layer.weight_quantizer
        scale = scale_from_amax(q.amax, q.spec).view([-1] + [1] * (layer.weight.dim() - 1))
        out[layer.name] = torch.round(layer.weight.detach() * torch.reciprocal(scale))
    return out


def adaround(model: nn.Module, data, **params) -> dict:
    context = AlgorithmContext(forward_loop=forward_loop(data), params=dict(PARAMS, **params))
    return get_algorithm("adaround").run(model, context)


def different_share(a: dict, b: dict) -> float:
    differ = sum(int((a[k] != b[k]).sum()) for k in a)
    return differ / sum(v.numel() for v in a.values())


def test_the_graphed_loop_learns_the_eager_loops_rounding():
    data = batches()
    base = quantized(conv_net(), data)
    graphed, eager = copy.deepcopy(base), copy.deepcopy(base)
    graphed_details = adaround(graphed, data)
    eager_details = adaround(eager, data, cuda_graphs=False)
    assert [r["optimizer"] for r in graphed_details["layers"]] == ["cuda-graph"] * 4
    assert [r["optimizer"] for r in eager_details["layers"]] == ["eager"] * 4
    assert different_share(codes(graphed), codes(eager)) <= MAX_DIFFERENT_CODES
    assert different_share(codes(graphed), codes(base)) > 0  # it learned something else than round-to-nearest
    for g, e in zip(graphed_details["layers"], eager_details["layers"]):
        assert g["soft_loss_first"] == pytest.approx(e["soft_loss_first"], rel=1e-4)
        assert g["loss_adaround"] == pytest.approx(e["loss_adaround"], rel=0.05, abs=1e-6)


def test_a_failed_capture_falls_back_to_the_eager_loop():
    data = batches()
    base = quantized(conv_net(syncing=True), data)
    graphed, eager = copy.deepcopy(base), copy.deepcopy(base)
    details = adaround(graphed, data)
    modes = {r["layer"]: r["optimizer"] for r in details["layers"]}
    assert modes["2"].startswith("eager (CUDA graph capture failed")
    assert all(mode == "cuda-graph" for name, mode in modes.items() if name != "2")
    torch.randn(4, device="cuda")  # the device's generator is not left in capture mode
    adaround(eager, data, cuda_graphs=False)
    assert different_share(codes(graphed), codes(eager)) <= MAX_DIFFERENT_CODES


def test_a_nan_in_the_replayed_iterations_names_its_iteration():
    rounding, loss_of, inputs, targets, _ = layer_case(3, device="cuda")
    targets = targets.clone()
    targets[7] = float("nan")  # the first mini-batch that draws this sample goes NaN
    params = dict(LOOP_PARAMS, iterations=150)
    index = batch_indices(inputs.shape[0], params["batch_size"], params["iterations"], torch.Generator().manual_seed(0),
                          inputs.device)
    betas = [beta_at(i, params) for i in range(params["iterations"])]
    with pytest.raises(NonFinite) as raised:
        optimize(rounding, loss_of, inputs, targets, index, betas, params["reg_weight"], params["lr"], cuda_graph=True)
    assert raised.value.iteration == int(torch.nonzero((index == 7).any(1))[0])


def test_a_nan_during_the_reconstruction_names_the_layer():
    data = batches()
    model = quantized(conv_net(), data)
    layer = quantized_layers(model)[1]
    inputs = torch.randn(32, 16, 16, 16, device="cuda")
    targets = torch.full((32, 16, 16, 16), float("nan"), device="cuda")
    with pytest.raises(AlgorithmError, match="NaN or Inf in the reconstruction of layer '2'"):
        _reconstruct(layer, inputs, targets, dict(DEFAULTS, **PARAMS), torch.Generator().manual_seed(0))


def test_graphed_adaround_learns_through_input_shift_hooks():
    # input-shift's output hook adds c * sum(W) with the weight the layer computes with: inside the
    # captured iteration that is AdaRound's soft weight, so the graph must replay the hook's reduction
    # too. The shifted model's INT8 error stays below the unshifted one's, graphed as eager.
    from tests.quantlab.algorithms.test_input_shift import chain

    data = [x.cuda() for x in batches(4)]
    reference = chain().cuda()
    errors = {}
    for name, algorithms in (("plain", ("adaround",)), ("shifted", ("input-shift", "adaround"))):
        model = chain().cuda()
        config = ql.int8_config("max", algorithms=algorithms, algorithm_params={"adaround": {"iterations": 50}})
        ql.quantize(model, config, forward_loop=forward_loop(data))
        with torch.no_grad():
            errors[name] = float(sum(((model(x) - reference(x)) ** 2).sum() for x in batches(2)))
    assert errors["shifted"] < 0.8 * errors["plain"], errors
