"""Mixed precision meets a target on a model with one planted bad layer, and names that layer."""
import copy

import pytest

import quantlab as ql
from quantlab.evaluation.autoprecision import auto_precision, without_layers
from quantlab.evaluation.evaluate import evaluate, evaluate_reference
from quantlab.evaluation.sensitivity import rank_layers
from quantlab.evaluation.tasks import ClassificationTask
from quantlab.ptq import run_ptq
from tests.evaluation.planted import planted_model


def test_keeps_the_planted_layer_in_fp16_and_meets_the_target(planted, tmp_path):
    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    scales = run_ptq(quant, calib, ["max"]).scales["max"]
    task = ClassificationTask()
    fp32 = evaluate_reference(model, task, evaluation).metrics["top1"]
    int8 = evaluate(quant, task, evaluation).metrics["top1"]
    assert fp32 == 100.0 and fp32 - int8 > 10.0  # the planted outlier really hurts
    order = rank_layers(model, quant, task, evaluation, metric="top1").order()
    task.set_reference(evaluate_reference(model, task, evaluation).state)
    result = auto_precision(quant, task, evaluation, metric="top1", fp32_value=fp32, order=order, max_drop=2.0, scales=scales)
    assert result.met and result.float_layers[0] == "bad"
    assert len(result.float_layers) <= 2 and fp32 - result.value <= 2.0
    assert result.int8 == pytest.approx(int8)
    # The scales file leaves the FP16 layers out entirely; loading it into a fresh model reproduces the result.
    path = result.scales.save(tmp_path / "scales.mixed.json")
    saved = ql.Scales.load(path)
    assert not any(e.module in result.float_layers for e in saved.entries)
    assert saved.float_layers == sorted(result.float_layers)
    fresh = ql.load_scales(planted_model(), path)
    modes = {(r.module_name, r.role): r.quantizer.mode.value for r in ql.iter_quantizers(fresh)}
    assert modes[("bad", "input")] == "off" and modes[("bad", "weight")] == "off"
    assert modes[("fc3", "input")] == "quantize" and modes[("fc3", "weight")] == "quantize"
    assert evaluate(fresh, task, evaluation).metrics["top1"] == pytest.approx(result.value)


def calibrated_with_fp32(planted):
    """(max-calibrated copy, task, eval batches, FP32 top-1) of the planted model."""
    model, calib, evaluation = planted
    quant = copy.deepcopy(model)
    run_ptq(quant, calib, ["max"])
    task = ClassificationTask()
    return quant, task, evaluation, evaluate_reference(model, task, evaluation).metrics["top1"]


def test_unreachable_target_reports_not_met(planted):
    quant, task, evaluation, fp32 = calibrated_with_fp32(planted)
    # Only "head" may move: it is not the culprit, so a 0-point drop cannot be met.
    result = auto_precision(quant, task, evaluation, metric="top1", fp32_value=fp32, order=["head"], max_drop=0.0)
    assert not result.met and result.float_layers == ["head"]
    # Relative targets: a fraction of the FP32 value.
    relative = auto_precision(quant, task, evaluation, metric="top1", fp32_value=fp32, order=["bad", "head"], max_drop=0.5, relative=True)
    assert relative.max_drop == 50.0 and relative.met


def test_without_layers_refuses_to_drop_everything(planted):
    model, calib, _ = planted
    scales = run_ptq(copy.deepcopy(model), calib, ["max"]).scales["max"]
    assert {e.module for e in without_layers(scales, ["bad"]).entries} == {"fc1", "fc3", "head"}
    with pytest.raises(Exception, match="nothing left"):
        without_layers(scales, ["fc1", "bad", "fc3", "head"])


def test_pruning_gives_back_layers_a_poor_order_added(planted):
    quant, task, evaluation, fp32 = calibrated_with_fp32(planted)
    # A misleading order puts two harmless layers before the culprit.
    result = auto_precision(quant, task, evaluation, metric="top1", fp32_value=fp32, order=["head", "fc3", "bad", "fc1"], max_drop=2.0)
    assert result.met and result.float_layers == ["bad"]
    unpruned = auto_precision(quant, task, evaluation, metric="top1", fp32_value=fp32, order=["head", "fc3", "bad", "fc1"],
                              max_drop=2.0, prune_evaluations=0)
    assert unpruned.float_layers == ["head", "fc3", "bad"]
