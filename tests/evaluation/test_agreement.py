"""top1_agreement / logit_kl against FP32, without labels."""
import math

import pytest
import torch
from torch import nn

from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.evaluate import evaluate, evaluate_reference
from quantlab.evaluation.tasks import AgreementTask, task_for_metric


class Fixed(nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, x):
        return self.outputs.pop(0)


def test_agreement_and_kl_on_unlabelled_batches():
    task, name = task_for_metric("top1_agreement")
    assert isinstance(task, AgreementTask) and name == "top1_agreement"
    assert not task.higher_is_better("logit_kl")
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    batches = [torch.zeros(4, 1)]  # bare inputs, no labels
    fp32 = evaluate_reference(Fixed([logits]), task, batches).metrics
    assert fp32 == {"top1_agreement": 100.0, "logit_kl": pytest.approx(0.0, abs=1e-12)}
    other = logits.clone()
    other[3] = torch.tensor([0.0, 1.0, 0.0])  # one of four changes its argmax
    metrics = evaluate(Fixed([other]), task, batches).metrics
    assert metrics["top1_agreement"] == 75.0
    p = torch.softmax(logits[3].double(), 0)
    q = torch.softmax(other[3].double(), 0)
    assert metrics["logit_kl"] == pytest.approx(float((p * (p / q).log()).sum()) / 4)
    assert task_for_metric("logit_kl")[1] == "logit_kl"


def test_agreement_needs_logits_and_a_reference():
    task = AgreementTask()
    with pytest.raises(EvaluationError, match="FP32 reference"):
        evaluate(Fixed([torch.zeros(2, 3)]), task, [torch.zeros(2, 1)])
    with pytest.raises(EvaluationError, match=r"\[batch, classes\]"):
        evaluate_reference(Fixed([torch.zeros(2, 3, 4)]), task, [torch.zeros(2, 1)])
    assert math.isfinite(evaluate_reference(Fixed([torch.zeros(2, 3)]), task, [torch.zeros(2, 1)]).metrics["logit_kl"])
