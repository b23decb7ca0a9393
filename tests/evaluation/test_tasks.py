"""Built-in tasks and metrics on hand-made outputs where the answer is known."""
import math

import pytest
import torch
from torch import nn

from quantlab.evaluation.errors import EvaluationError, MetricError, UnknownMetricError
from quantlab.evaluation.evaluate import evaluate, evaluate_reference
from quantlab.evaluation.tasks import (
    CausalLMTask,
    ClassificationTask,
    EmbeddingTask,
    FunctionTask,
    cast_floating,
    task_for_metric,
)


class Fixed(nn.Module):
    """Returns a fixed tensor per call, whatever the input."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x=None, **kwargs):
        return self.outputs.pop(0)


def test_classification_top1_top5_and_agreement():
    logits = torch.eye(10)[[0, 1, 2, 3]] * 5.0
    logits[2] = -torch.arange(10.0)  # predicts 0, top 5 = 0..4: label 5 misses both
    logits[3] = torch.arange(10.0)  # predicts 9, top 5 = 9..5: label 7 is in the top 5
    labels = torch.tensor([0, 1, 5, 7])
    task = ClassificationTask()
    fp32 = evaluate_reference(Fixed([logits]), task, [(torch.zeros(4, 1), labels)])
    assert fp32.metrics["top1"] == pytest.approx(50.0)  # rows 0, 1 right
    assert fp32.metrics["top5"] == pytest.approx(75.0)  # row 3: label 7 is in {9,8,7,6,5}
    assert fp32.metrics["top1_agreement"] == 100.0
    other = logits.clone()
    other[0] = torch.eye(10)[4]
    assert evaluate(Fixed([other]), task, [(torch.zeros(4, 1), labels)]).metrics["top1_agreement"] == 75.0


def test_embedding_cosine_and_probe():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    centers = torch.randn(2, 8, generator=g) * 3
    emb = centers[labels] + torch.randn(200, 8, generator=g) * 0.5
    task = EmbeddingTask(normalize=False)
    batches = [{"input_ids": torch.zeros(100, 3, dtype=torch.long), "labels": labels[i : i + 100]} for i in (0, 100)]
    fp32 = evaluate_reference(Fixed([emb[:100], emb[100:]]), task, batches)
    assert fp32.metrics["cosine"] == pytest.approx(1.0)
    assert fp32.metrics["probe_accuracy"] > 95.0
    noisy = evaluate(Fixed([emb[:100] + 2.0, emb[100:] + 2.0]), task, batches).metrics
    assert noisy["cosine"] < 0.999


def test_embedding_mean_pooling_respects_the_mask():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    task = EmbeddingTask(normalize=False)
    pooled = task.forward(lambda **kw: hidden, {"input_ids": torch.zeros(1, 3), "attention_mask": torch.tensor([[1, 1, 0]])})
    assert torch.allclose(pooled, torch.tensor([[2.0, 0.0]]))


def test_causal_lm_perplexity_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    task = CausalLMTask()
    metrics = evaluate_reference(Fixed([logits]), task, [{"input_ids": ids, "attention_mask": mask}]).metrics
    valid = mask[:, 1:].bool()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid])
    assert metrics["perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert metrics["token_agreement"] == 100.0
    assert task.higher_is_better("perplexity") is False


def test_function_metric_and_errors(tmp_path):
    module = tmp_path / "my_metrics.py"
    module.write_text(
        "def mae(outputs, targets):\n    return float((outputs.squeeze(1) - targets).abs().mean())\n"
        "mae.higher_is_better = False\n"
        "def both(outputs, targets):\n    return {'a': 1.0, 'b': 2}\n"
        "def broken(outputs, targets):\n    raise ValueError('boom in user code')\n"
        "def text(outputs, targets):\n    return 'high'\n"
    )
    batches = [(torch.zeros(4, 1), torch.ones(4))]
    task, metric = task_for_metric(f"{module}:mae")
    assert metric == "mae" and not task.higher_is_better("mae")
    assert evaluate(Fixed([torch.full((4, 1), 3.0)]), task, batches).metrics == {"mae": 2.0}
    task, _ = task_for_metric(f"{module}:both")
    assert evaluate(Fixed([torch.zeros(4, 1)]), task, batches).metrics == {"a": 1.0, "b": 2.0}
    with pytest.raises(MetricError, match="my_metrics.py:broken raised ValueError: boom in user code"):
        evaluate(Fixed([torch.zeros(4, 1)]), task_for_metric(f"{module}:broken")[0], batches)
    with pytest.raises(MetricError, match="not a number"):
        evaluate(Fixed([torch.zeros(4, 1)]), task_for_metric(f"{module}:text")[0], batches)
    with pytest.raises(UnknownMetricError, match="no attribute 'missing'"):
        task_for_metric(f"{module}:missing")
    with pytest.raises(UnknownMetricError, match="unknown metric 'top7'.*perplexity"):
        task_for_metric("top7")


def test_wrong_shapes_are_named():
    task = ClassificationTask()
    with pytest.raises(EvaluationError, match=r"eval batch 0: classification needs \[batch, classes\] logits"):
        evaluate(Fixed([torch.zeros(4, 10, 2)]), task, [(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(EvaluationError, match=r"labels tensor\[3\] int64 do not fit logits tensor\[4, 10\]"):
        evaluate(Fixed([torch.zeros(4, 10)]), task, [(torch.zeros(4, 1), torch.zeros(3, dtype=torch.long))])
    with pytest.raises(EvaluationError, match="has no labels"):
        evaluate(Fixed([torch.zeros(4, 10)]), task, [torch.zeros(4, 1)])
    with pytest.raises(EvaluationError, match="eval data is empty"):
        evaluate(Fixed([]), task, [])


def test_cast_floating_keeps_integer_ids():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixels": torch.ones(2), "nested": (torch.ones(1),)}
    cast = cast_floating(batch, torch.float16)
    assert cast["input_ids"].dtype == torch.long and cast["pixels"].dtype == torch.float16
    assert cast["nested"][0].dtype == torch.float16
