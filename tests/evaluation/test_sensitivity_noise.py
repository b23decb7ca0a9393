"""Sensitivity rows carry n and a paired test (layer in float vs all INT8 on the same samples)."""
import copy

from quantlab.evaluation.noise import mcnemar_exact
from quantlab.evaluation.evaluate import evaluate, evaluate_reference
from quantlab.evaluation.sensitivity import layers_in_float, rank_layers
from quantlab.evaluation.tasks import ClassificationTask
from quantlab.ptq import run_ptq


def test_recovery_is_tested_against_all_int8_on_the_same_samples(planted):
    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    run_ptq(quant, calib, ["max"])
    task = ClassificationTask()
    result = rank_layers(model, quant, task, evaluation, metric="top1")
    top = result.layers[0]
    subset = evaluation[: result.subset_batches]
    assert top.layer == "bad" and top.n == sum(int(b[1].shape[0]) for b in subset)
    assert top.within_noise is False and top.p_value < 0.05  # a large planted recovery is no noise
    # The p-value is McNemar's on the two models' per-sample hits, recomputed here.
    evaluate_reference(model, task, subset)
    base = evaluate(quant, task, subset).state
    with layers_in_float(quant, ["bad"]):
        fixed = evaluate(quant, task, subset).state
    import torch

    a, b = torch.cat(base["hits1"]), torch.cat(fixed["hits1"])
    assert top.p_value == mcnemar_exact(int((a & ~b).sum()), int((b & ~a).sum()))
    row = result.to_rows("max")[0]
    assert row["sensitivity_n"] == top.n and row["sensitivity_p"] == top.p_value and row["sensitivity_within_noise"] is False
    unevaluated = [e for e in result.layers if e.sensitivity is None]
    assert all(e.n is None and e.within_noise is None for e in unevaluated)
