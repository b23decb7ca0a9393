"""AdaRound's optimization loop (quantlab.algorithms._adaround_loop) on the CPU: the
restructured eager loop is the former per-iteration loop (same mini-batches, same
rounding, bit for bit), and the iteration the CUDA graph captures, run eagerly, learns
the same rounding."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantlab.algorithms._adaround_loop import GraphStep, NonFinite, batch_indices, optimize, run_step_eagerly
from quantlab.algorithms.adaround import DEFAULTS, LayerRounding, beta_at


def layer_case(seed: int = 0, samples: int = 48, device: str = "cpu"):
    """A grouped conv with a spread of channel scales, its 4-bit rounding, cached inputs and FP32 targets."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * torch.logspace(-1, 0, 6).view(6, 1, 1, 1))
        conv.bias.copy_(torch.randn(6, generator=g) * 0.1)
    fp32_inputs = torch.randn(samples, 6, 8, 8, generator=g)
    with torch.no_grad():
        targets = conv(fp32_inputs)
    # The quantized model's inputs: a coarse grid and a systematic error that the rounding can compensate.
    inputs = torch.round(fp32_inputs * 4) / 4 * torch.linspace(0.8, 1.2, 6).view(1, 6, 1, 1)
    conv, inputs, targets = conv.to(device), inputs.to(device), targets.to(device)
    amax = conv.weight.detach().abs().amax((1, 2, 3))
    scale = amax / 7  # 4 bits, narrow range
    rounding = LayerRounding(conv.weight, scale, 0, -7, 7, 7)
    weight = conv.weight

    def loss_of(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.conv2d(x, w, conv.bias, padding=1, groups=2)
        return (out - y).pow(2).sum(1).mean()

    return rounding, loss_of, inputs, targets, weight


def reference_loop(rounding, loss_of, inputs, targets, params, generator):
    """The loop as it was before the restructuring: a randint and a copy per iteration, the
    regularizer over a boolean mask, NaN checks every 100 iterations."""
    optimizer = torch.optim.Adam([rounding.v], lr=params["lr"])
    samples = inputs.shape[0]
    batch = min(params["batch_size"], samples)
    free = ~rounding.fixed
    for iteration in range(params["iterations"]):
        index = torch.randint(0, samples, (batch,), generator=generator).to(inputs.device)
        reconstruction = loss_of(rounding.soft_weight(), inputs[index], targets[index])
        beta = beta_at(iteration, params)
        regularizer = None if beta is None else (1 - (2 * rounding.h()[free] - 1).abs().pow(beta)).sum()
        loss = reconstruction if beta is None else reconstruction + params["reg_weight"] * regularizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return rounding


PARAMS = dict(DEFAULTS, iterations=120, batch_size=16)


def run_new(case, params, generator, cuda_graph=False):
    rounding, loss_of, inputs, targets, _ = case
    index = batch_indices(inputs.shape[0], min(params["batch_size"], inputs.shape[0]), params["iterations"], generator,
                          inputs.device)
    betas = [beta_at(i, params) for i in range(params["iterations"])]
    return optimize(rounding, loss_of, inputs, targets, index, betas, params["reg_weight"], params["lr"],
                    cuda_graph=cuda_graph)


def test_indices_are_the_former_per_iteration_draws_and_leave_the_generator_where_they_did():
    one, many = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = batch_indices(100, 32, 50, one, torch.device("cpu"))
    former = torch.stack([torch.randint(0, 100, (32,), generator=many) for _ in range(50)])
    assert torch.equal(drawn, former)
    assert torch.equal(torch.randint(0, 100, (8,), generator=one), torch.randint(0, 100, (8,), generator=many))


def test_the_eager_loop_learns_the_former_loops_rounding_bit_for_bit():
    old_case, new_case = layer_case(), layer_case()
    reference = reference_loop(old_case[0], *old_case[1:4], PARAMS, torch.Generator().manual_seed(0))
    outcome = run_new(new_case, PARAMS, torch.Generator().manual_seed(0))
    assert outcome.mode == "eager"
    assert torch.equal(new_case[0].v, reference.v)
    codes = new_case[0].codes(hard=True)
    assert torch.equal(codes, reference.codes(hard=True))
    assert not torch.equal(codes, new_case[0].nearest)  # it learned something else than round-to-nearest
    assert math.isfinite(outcome.first_loss) and outcome.last_loss < outcome.first_loss


def test_the_captured_iteration_run_eagerly_learns_the_same_rounding():
    eager_case, step_case = layer_case(1), layer_case(1)
    eager = run_new(eager_case, PARAMS, torch.Generator().manual_seed(0))
    rounding, loss_of, inputs, targets, _ = step_case
    index = batch_indices(inputs.shape[0], PARAMS["batch_size"], PARAMS["iterations"], torch.Generator().manual_seed(0),
                          inputs.device)
    betas = [beta_at(i, PARAMS) for i in range(PARAMS["iterations"])]
    step = GraphStep(rounding, loss_of, inputs, targets, index, betas, PARAMS["reg_weight"], PARAMS["lr"])
    outcome = run_step_eagerly(step, PARAMS["iterations"])
    assert int(step.counter) == PARAMS["iterations"]
    # The same computation up to float rounding (a regularizer times 0 in the warm start, a 0-d tensor beta):
    # at most 1% of the codes may differ (none did on the CPU when this was written).
    differ = (rounding.codes(hard=True) != eager_case[0].codes(hard=True)).float().mean()
    assert float(differ) <= 0.01
    assert outcome.first_loss == pytest.approx(eager.first_loss, rel=1e-5)
    assert outcome.last_loss == pytest.approx(eager.last_loss, rel=1e-3)


def test_no_graph_is_tried_on_the_cpu():
    outcome = run_new(layer_case(2), dict(PARAMS, iterations=5), torch.Generator().manual_seed(0), cuda_graph=True)
    assert outcome.mode == "eager"


@pytest.mark.parametrize("runner", ["eager", "step"])
def test_a_nan_names_the_first_checked_iteration(runner):
    rounding, loss_of, inputs, targets, _ = layer_case(3)
    targets = targets.clone()
    targets[7] = float("nan")  # the first mini-batch that draws this sample goes NaN
    params = dict(PARAMS, iterations=150)
    generator = torch.Generator().manual_seed(0)
    index = batch_indices(inputs.shape[0], params["batch_size"], params["iterations"], generator, inputs.device)
    betas = [beta_at(i, params) for i in range(params["iterations"])]
    with pytest.raises(NonFinite) as raised:
        if runner == "eager":
            optimize(rounding, loss_of, inputs, targets, index, betas, params["reg_weight"], params["lr"], cuda_graph=False)
        else:
            run_step_eagerly(GraphStep(rounding, loss_of, inputs, targets, index, betas, params["reg_weight"],
                                       params["lr"]), params["iterations"])
    first_bad = int(torch.nonzero((index == 7).any(1))[0])
    # eager: found at its first check (iteration 0 or 100); the step's history names the very iteration.
    expected = first_bad if runner == "step" else (0 if first_bad == 0 else 100)
    assert raised.value.iteration == expected
