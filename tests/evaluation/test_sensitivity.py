"""Sensitivity ranking: finds the planted layer within the <= 3 eval passes budget."""
import copy

import pytest

from quantlab.evaluation.evaluate import evaluate
from quantlab.evaluation.sensitivity import full_ranking, layers_in_float, plan_budget, proxy_agreement, rank_layers
from quantlab.evaluation.tasks import ClassificationTask
from quantlab.ptq import run_ptq


@pytest.mark.parametrize("num_batches", [1, 2, 4, 8, 10, 37])
@pytest.mark.parametrize("num_layers", [1, 4, 211])
@pytest.mark.parametrize("top_k", [None, 3, 50])
def test_budget_is_never_exceeded(num_batches, num_layers, top_k):
    proxy_batches = min(num_batches, 2 if num_batches >= 4 else 1)
    plan = plan_budget(num_batches, num_layers, budget_passes=3.0, top_k=top_k, subset_fraction=0.25, proxy_batches=proxy_batches)
    cost = 3 * proxy_batches + plan["subset"] * (plan["top_k"] + 2)
    assert plan["top_k"] <= num_layers
    if plan["top_k"] > 0:
        assert cost <= 3 * num_batches
        assert 1 <= plan["subset"] <= num_batches


def test_rank_layers_finds_the_planted_layer(planted):
    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    run_ptq(quant, calib, ["max"])
    task = ClassificationTask()
    result = rank_layers(model, quant, task, evaluation, metric="top1")
    assert result.cost_passes <= 3.0
    assert result.order()[0] == "bad"
    assert result.layers[0].sensitivity > 10.0  # keeping "bad" in float recovers a lot of top-1
    assert result.evaluated and result.baseline < result.fp32
    assert [e.rank for e in result.layers] == list(range(1, 5))
    rows = result.to_rows("max")
    assert rows[0]["layer"] == "bad" and rows[0]["local_sqnr_db"] is not None
    # The expensive reference ranking agrees with the proxy on the top layer.
    full = full_ranking(quant, task, evaluation[: result.subset_batches], metric="top1", layers=result.order())
    assert max(full, key=full.get) == "bad"
    agreement = proxy_agreement(result.layer_errors, full)
    assert agreement["layers"] == 4 and agreement["top_k_overlap"] == 1.0


def test_layers_in_float_restores_modes(planted):
    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    run_ptq(quant, calib, ["max"])
    task = ClassificationTask()
    before = evaluate(quant, task, evaluation[:2]).metrics["top1"]
    with layers_in_float(quant, ["fc1", "bad", "fc3", "head"]):
        assert evaluate(quant, task, evaluation[:2]).metrics["top1"] == 100.0
    assert evaluate(quant, task, evaluation[:2]).metrics["top1"] == before
