"""Tasks: how to run a batch through a model and how to score the outputs.

A :class:`Task` streams: :meth:`Task.forward` runs one batch, :meth:`Task.update`
folds the outputs into a state dict, :meth:`Task.compute` turns the state into
metrics. Metrics that compare against FP32 (embedding cosine, next-token
agreement, linear probe) get the FP32 state once through
:meth:`Task.set_reference` before any other precision is scored.

Built-in tasks, chosen by metric name with :func:`task_for_metric`:

* image classification: ``top1``, ``top5`` (percent, labelled data);
  ``top1_agreement`` (percent) and ``logit_kl`` (nats) against FP32, labels not needed;
* sentence embeddings: ``cosine`` (mean cosine to FP32 embeddings) and
  ``probe_accuracy`` (a linear probe trained on FP32 embeddings, percent);
* causal LM: ``perplexity`` (lower is better), ``token_agreement`` (argmax next
  token equal to FP32's, percent), ``next_token_accuracy`` (percent);
* ``module:function`` or ``file.py:function``: a user metric
  ``fn(outputs, targets) -> float | dict`` over the whole eval set (set
  ``fn.higher_is_better = False`` for losses).
"""
from __future__ import annotations

import abc
import inspect
import math
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Tuple

import torch

from quantlab.batching import call_model, main_tensor, split_batch
from quantlab.evaluation.errors import EvaluationError, MetricError, UnknownMetricError
from quantlab.evaluation.noise import SampleScores
from quantlab.evaluation.probe import LinearProbe


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def first_tensor(output: Any, prefer: Tuple[str, ...] = ("logits", "last_hidden_state")) -> torch.Tensor:
    """The main tensor of a model output (tensor, HF ModelOutput, dict or tuple).

    Raises:
        EvaluationError: the output holds no tensor.
    """
    tensor = main_tensor(output, prefer)
    if tensor is None:
        raise EvaluationError(f"cannot find an output tensor in the model's output ({_describe(output)})")
    return tensor


class Task(abc.ABC):
    """How to run a batch and how to score it.

    Attributes:
        name: Task name (recorded with the run).
        metrics: Metric names :meth:`compute` returns; the first is the default.
        lower_is_better: Metrics where smaller is better (e.g. perplexity).
    """

    name: str = "task"
    metrics: Tuple[str, ...] = ()
    lower_is_better: FrozenSet[str] = frozenset()
    #: :meth:`forward` returns logits over its last dimension (output fidelity adds agreement and KL).
    outputs_are_logits: bool = False

    def higher_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better

    def params(self) -> Dict[str, Any]:
        """JSON-serializable parameters (recorded in the run config)."""
        return {}

    # -- running ------------------------------------------------------------------------------------
    def inputs(self, batch: Any) -> Any:
        """What the model is called with (default: ``split_batch(batch)[0]``)."""
        return split_batch(batch)[0]

    def targets(self, batch: Any) -> Optional[torch.Tensor]:
        """Labels of a batch, if any."""
        return split_batch(batch)[1]

    def forward(self, model: Callable[..., Any], inputs: Any) -> torch.Tensor:
        """Runs the model; returns its main output tensor as float32."""
        return first_tensor(call_model(model, inputs)).float()

    # -- scoring ----------------------------------------------------------------------------------
    def new_state(self) -> Dict[str, Any]:
        return {}

    @abc.abstractmethod
    def update(self, state: Dict[str, Any], outputs: torch.Tensor, batch: Any, index: int) -> None:
        """Folds one batch's outputs into ``state``; raises EvaluationError if they do not fit."""

    @abc.abstractmethod
    def compute(self, state: Dict[str, Any]) -> Dict[str, float]:
        """Metrics from a finished state."""

    def set_reference(self, fp32_state: Dict[str, Any]) -> None:
        """Receives the FP32 state (for metrics relative to FP32). Default: nothing."""

    def sample_scores(self, state: Dict[str, Any]) -> Dict[str, SampleScores]:
        """Per-sample values behind each metric of a finished state (for n, intervals and paired
        tests: :mod:`quantlab.evaluation.noise`). Default: none (a user metric over the whole set)."""
        return {}


# -- image classification ----------------------------------------------------------------------------
class ClassificationTask(Task):
    """Top-1 / top-5 accuracy (percent) of ``[batch, classes]`` logits against integer labels,
    plus ``top1_agreement``: the percentage of predictions equal to FP32's."""

    name = "classification"
    metrics = ("top1", "top5", "top1_agreement")
    outputs_are_logits = True

    def new_state(self) -> Dict[str, Any]:
        return {"correct1": 0, "correct5": 0, "count": 0, "predictions": [], "num_classes": None, "hits1": [], "hits5": []}

    def update(self, state, outputs, batch, index):
        targets = self.targets(batch)
        if targets is None:
            raise EvaluationError(f"eval batch {index} has no labels: classification needs (inputs, labels) batches")
        if outputs.dim() != 2:
            raise EvaluationError(
                f"eval batch {index}: classification needs [batch, classes] logits, the model returned {_describe(outputs)}"
            )
        targets = targets.view(-1) if targets.dim() > 1 and targets.numel() == outputs.shape[0] else targets
        if targets.dim() != 1 or targets.shape[0] != outputs.shape[0] or targets.is_floating_point():
            raise EvaluationError(
                f"eval batch {index}: labels {_describe(targets)} do not fit logits {_describe(outputs)} "
                "(expected one integer label per row)"
            )
        targets = targets.to(outputs.device)
        k = min(5, outputs.shape[1])
        top = outputs.topk(k, dim=1).indices
        hits1, hits5 = top[:, 0] == targets, (top == targets[:, None]).any(dim=1)
        state["correct1"] += int(hits1.sum())
        state["correct5"] += int(hits5.sum())
        state.setdefault("hits1", []).append(hits1.cpu())
        state.setdefault("hits5", []).append(hits5.cpu())
        state["count"] += int(targets.shape[0])
        state["predictions"].append(top[:, 0].cpu())
        state["num_classes"] = outputs.shape[1]

    def compute(self, state):
        if state["count"] == 0:
            raise EvaluationError("the eval data is empty")
        out = {"top1": 100.0 * state["correct1"] / state["count"]}
        if (state["num_classes"] or 0) > 5:
            out["top5"] = 100.0 * state["correct5"] / state["count"]
        reference = getattr(self, "_reference", None)
        if reference is not None:
            predictions = torch.cat(state["predictions"])
            if predictions.shape == reference.shape:
                out["top1_agreement"] = 100.0 * float((predictions == reference).double().mean())
        return out

    def set_reference(self, fp32_state):
        self._reference = torch.cat(fp32_state["predictions"]) if fp32_state["predictions"] else None

    def sample_scores(self, state):
        if not state.get("hits1"):
            return {}
        out = {"top1": SampleScores("proportion", torch.cat(state["hits1"]).double().tolist())}
        if (state["num_classes"] or 0) > 5:
            out["top5"] = SampleScores("proportion", torch.cat(state["hits5"]).double().tolist())
        reference = getattr(self, "_reference", None)
        if reference is not None:
            predictions = torch.cat(state["predictions"])
            if predictions.shape == reference.shape:
                out["top1_agreement"] = SampleScores("proportion", (predictions == reference).double().tolist(), paired=False)
        return out


class AgreementTask(Task):
    """Classifier logits against FP32's, no labels needed (e.g. ImageNet models on unlabelled photos).

    ``top1_agreement``: percent of samples whose argmax equals FP32's.
    ``logit_kl``: mean over samples of KL(softmax(FP32 logits) || softmax(logits)), in nats
    (lower is better). Labels in the batch, if any, are ignored.
    """

    name = "agreement"
    metrics = ("top1_agreement", "logit_kl")
    lower_is_better = frozenset({"logit_kl"})

    def __init__(self) -> None:
        self._reference: Optional[torch.Tensor] = None

    def new_state(self):
        return {"log_probs": []}

    def update(self, state, outputs, batch, index):
        if outputs.dim() != 2:
            raise EvaluationError(
                f"eval batch {index}: agreement needs [batch, classes] logits, the model returned {_describe(outputs)}"
            )
        state["log_probs"].append(torch.log_softmax(outputs.detach().float(), dim=1).cpu())

    def set_reference(self, fp32_state):
        self._reference = torch.cat(fp32_state["log_probs"]) if fp32_state["log_probs"] else None

    def compute(self, state):
        if not state["log_probs"]:
            raise EvaluationError("the eval data is empty")
        log_probs = torch.cat(state["log_probs"])
        if self._reference is None:
            raise EvaluationError("top1_agreement / logit_kl need the FP32 reference outputs first")
        if self._reference.shape != log_probs.shape:
            raise EvaluationError(f"logits {list(log_probs.shape)} do not match the FP32 reference {list(self._reference.shape)}")
        reference = self._reference.double()
        kl = (reference.exp() * (reference - log_probs.double())).sum(dim=1)
        return {
            "top1_agreement": 100.0 * float((log_probs.argmax(1) == self._reference.argmax(1)).double().mean()),
            "logit_kl": float(kl.mean()),
        }


# -- sentence embeddings ------------------------------------------------------------------------------
class EmbeddingTask(Task):
    """Sentence embeddings: mean-pooled token states (with the attention mask).

    ``cosine``: mean over samples of cos(embedding, FP32 embedding).
    ``probe_accuracy``: a logistic-regression probe is trained on the FP32
    embeddings of half of the eval samples (a fixed seeded permutation, so the
    order of the data cannot bias the split) and scores every precision on the
    other half (percent). Needs ``labels`` in the batch.

    Args:
        pooling: ``"mean"`` (masked mean of token states) or ``"cls"`` (first token).
        normalize: L2-normalize the pooled embeddings (as sentence-transformers does).
    """

    name = "embedding"
    metrics = ("cosine", "probe_accuracy")

    def __init__(self, pooling: str = "mean", normalize: bool = True) -> None:
        if pooling not in ("mean", "cls"):
            raise EvaluationError(f"unknown pooling {pooling!r}: use 'mean' or 'cls'")
        self.pooling = pooling
        self.normalize = normalize
        self._reference: Optional[torch.Tensor] = None
        self._probe: Optional[LinearProbe] = None

    def params(self):
        return {"pooling": self.pooling, "normalize": self.normalize}

    def inputs(self, batch):
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k != "labels"}  # encoders do not take labels
        return split_batch(batch)[0]

    def forward(self, model, inputs):
        hidden = first_tensor(call_model(model, inputs), prefer=("last_hidden_state", "sentence_embedding", "logits")).float()
        if hidden.dim() == 2:
            pooled = hidden  # the model already pools
        elif hidden.dim() == 3:
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                if mask is None:
                    pooled = hidden.mean(dim=1)
                else:
                    m = mask.to(hidden.dtype).unsqueeze(-1)
                    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        else:
            raise EvaluationError(f"embedding task needs [batch, tokens, hidden] or [batch, hidden] outputs, got {_describe(hidden)}")
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def new_state(self):
        return {"embeddings": [], "labels": []}

    def update(self, state, outputs, batch, index):
        if outputs.dim() != 2:
            raise EvaluationError(f"eval batch {index}: expected [batch, hidden] embeddings, got {_describe(outputs)}")
        state["embeddings"].append(outputs.detach().cpu())
        labels = self.targets(batch)
        if labels is not None:
            labels = labels.view(-1).cpu()
            if labels.shape[0] != outputs.shape[0] or labels.is_floating_point():
                raise EvaluationError(f"eval batch {index}: labels {_describe(labels)} do not fit embeddings {_describe(outputs)}")
            state["labels"].append(labels)

    @staticmethod
    def probe_split(num_samples: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(train indices, test indices): a seeded half/half split of the eval samples."""
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(0))
        return order[: num_samples // 2], order[num_samples // 2 :]

    def set_reference(self, fp32_state):
        embeddings = torch.cat(fp32_state["embeddings"])
        self._reference = embeddings
        self._probe = None
        if fp32_state["labels"]:
            labels = torch.cat(fp32_state["labels"])
            train, _ = self.probe_split(len(labels))
            if len(labels) >= 4 and len(torch.unique(labels[train])) >= 2:
                self._probe = LinearProbe.fit(embeddings[train], labels[train])

    def compute(self, state):
        if not state["embeddings"]:
            raise EvaluationError("the eval data is empty")
        embeddings = torch.cat(state["embeddings"])
        out: Dict[str, float] = {}
        if self._reference is not None:
            if self._reference.shape != embeddings.shape:
                raise EvaluationError(
                    f"embeddings {list(embeddings.shape)} do not match the FP32 reference {list(self._reference.shape)}"
                )
            cos = torch.nn.functional.cosine_similarity(embeddings.double(), self._reference.double(), dim=1)
            out["cosine"] = float(cos.mean())
        if self._probe is not None and state["labels"]:
            labels = torch.cat(state["labels"])
            _, test = self.probe_split(len(labels))
            out["probe_accuracy"] = self._probe.accuracy(embeddings[test], labels[test])
        return out

    def sample_scores(self, state):
        if not state["embeddings"]:
            return {}
        embeddings = torch.cat(state["embeddings"])
        out: Dict[str, SampleScores] = {}
        if self._reference is not None and self._reference.shape == embeddings.shape:
            cos = torch.nn.functional.cosine_similarity(embeddings.double(), self._reference.double(), dim=1)
            out["cosine"] = SampleScores("mean", cos.tolist(), paired=False)
        if self._probe is not None and state["labels"]:
            labels = torch.cat(state["labels"])
            _, test = self.probe_split(len(labels))
            hits = (self._probe.predict(embeddings[test]).view(-1) == labels[test].view(-1)).double()
            out["probe_accuracy"] = SampleScores("proportion", hits.tolist())
        return out


# -- causal language models -----------------------------------------------------------------------------
class CausalLMTask(Task):
    """Perplexity and next-token agreement of a decoder-only LM on token-id batches.

    Batches are dicts with ``input_ids`` (and ``attention_mask``); positions
    whose next token is padding (mask 0) or labelled -100 are not scored.
    """

    name = "causal_lm"
    metrics = ("perplexity", "token_agreement", "next_token_accuracy")
    lower_is_better = frozenset({"perplexity"})
    outputs_are_logits = True

    def inputs(self, batch):
        if isinstance(batch, dict):
            if "input_ids" not in batch:
                raise EvaluationError(f"causal LM batches need 'input_ids', got keys {sorted(batch)}")
            return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if isinstance(batch, torch.Tensor):
            return {"input_ids": batch}
        return split_batch(batch)[0]

    def forward(self, model, inputs):
        # Logits are kept in the model's dtype here; update() reduces them in float32 per batch.
        return first_tensor(call_model(model, inputs))

    def new_state(self):
        return {"nll": 0.0, "count": 0, "correct": 0, "predictions": [], "token_nll": [], "token_hits": []}

    def update(self, state, outputs, batch, index):
        ids = batch["input_ids"] if isinstance(batch, dict) else (batch if isinstance(batch, torch.Tensor) else split_batch(batch)[0])
        if outputs.dim() != 3 or outputs.shape[:2] != ids.shape:
            raise EvaluationError(
                f"eval batch {index}: causal LM needs [batch, tokens, vocab] logits for input_ids {_describe(ids)}, "
                f"the model returned {_describe(outputs)}"
            )
        targets = ids[:, 1:]
        valid = torch.ones_like(targets, dtype=torch.bool)
        if isinstance(batch, dict) and batch.get("attention_mask") is not None:
            valid &= batch["attention_mask"][:, 1:].bool()
        if isinstance(batch, dict) and batch.get("labels") is not None:
            valid &= batch["labels"][:, 1:] != -100
        logits = outputs[:, :-1][valid].float()
        wanted = targets[valid]
        token_nll = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
        state["nll"] += float(token_nll.sum())
        predicted = logits.argmax(dim=-1)
        hits = predicted == wanted
        state["correct"] += int(hits.sum())
        state.setdefault("token_nll", []).append(token_nll.detach().float().cpu())
        state.setdefault("token_hits", []).append(hits.cpu())
        state["count"] += int(wanted.numel())
        state["predictions"].append(predicted.to(torch.int32).cpu())

    def compute(self, state):
        if state["count"] == 0:
            raise EvaluationError("the eval data holds no scorable tokens")
        mean_nll = state["nll"] / state["count"]
        out = {
            "perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf,
            "next_token_accuracy": 100.0 * state["correct"] / state["count"],
        }
        reference = getattr(self, "_reference", None)
        if reference is not None:
            predictions = torch.cat(state["predictions"])
            if predictions.shape == reference.shape:
                out["token_agreement"] = 100.0 * float((predictions == reference).double().mean())
        return out

    def set_reference(self, fp32_state):
        self._reference = torch.cat(fp32_state["predictions"]) if fp32_state["predictions"] else None

    def sample_scores(self, state):
        if not state.get("token_nll"):
            return {}
        out = {
            "perplexity": SampleScores("exp_mean", torch.cat(state["token_nll"]).double().tolist(), unit="tokens"),
            "next_token_accuracy": SampleScores("proportion", torch.cat(state["token_hits"]).double().tolist(), unit="tokens"),
        }
        reference = getattr(self, "_reference", None)
        if reference is not None:
            predictions = torch.cat(state["predictions"])
            if predictions.shape == reference.shape:
                out["token_agreement"] = SampleScores("proportion", (predictions == reference).double().tolist(),
                                                      unit="tokens", paired=False)
        return out


# -- user metric function ---------------------------------------------------------------------------------
class FunctionTask(Task):
    """A user metric ``fn(outputs, targets) -> float | dict[str, float]``.

    ``outputs`` are the model's main output tensors of all eval batches
    concatenated along dim 0 (float32, CPU), ``targets`` the concatenated labels
    or None. A ``higher_is_better = False`` attribute on ``fn`` marks a loss.

    Args:
        spec: ``package.module:function`` or ``file.py:function``.
    """

    name = "function"

    def __init__(self, spec: str, fn: Optional[Callable[..., Any]] = None) -> None:
        from quantlab.model_source import ModelLoadError, load_callable

        self.spec = spec
        if fn is None:
            try:
                fn = load_callable(spec)
            except ModelLoadError as exc:
                raise UnknownMetricError(f"metric {spec!r}: {exc}") from None
        if not callable(fn):
            raise UnknownMetricError(f"metric {spec!r} is not callable")
        self.fn = fn
        self.metric_name = getattr(fn, "__name__", spec.rpartition(":")[2]) or "metric"
        self.metrics = (self.metric_name,)
        if getattr(fn, "higher_is_better", True) is False:
            self.lower_is_better = frozenset({self.metric_name})

    def params(self):
        return {"spec": self.spec}

    def new_state(self):
        return {"outputs": [], "targets": []}

    def update(self, state, outputs, batch, index):
        state["outputs"].append(outputs.detach().cpu())
        targets = self.targets(batch)
        if targets is not None:
            state["targets"].append(targets.detach().cpu())

    def compute(self, state):
        if not state["outputs"]:
            raise EvaluationError("the eval data is empty")
        try:
            outputs = torch.cat(state["outputs"])
            targets = torch.cat(state["targets"]) if state["targets"] else None
        except RuntimeError as exc:
            raise EvaluationError(f"metric {self.spec}: eval batches have inconsistent output shapes ({exc})") from None
        try:
            value = self.fn(outputs, targets)
        except Exception as exc:  # noqa: BLE001 - any failure of user code is reported with its origin
            raise MetricError(f"metric function {self.spec} raised {type(exc).__name__}: {exc}") from exc
        values = value if isinstance(value, dict) else {self.metric_name: value}
        out = {}
        for key, v in values.items():
            try:
                number = float(v)
            except (TypeError, ValueError):
                raise MetricError(f"metric function {self.spec} returned {v!r} for {key!r}, not a number") from None
            if math.isnan(number):
                raise MetricError(f"metric function {self.spec} returned NaN for {key!r}")
            out[str(key)] = number
        if isinstance(value, dict):
            self.metrics = tuple(out)
        return out


# -- registry --------------------------------------------------------------------------------------------
_METRIC_TASKS: Dict[str, Callable[[], Task]] = {
    "top1": ClassificationTask,
    "top5": ClassificationTask,
    "accuracy": ClassificationTask,
    "top1_agreement": AgreementTask,
    "logit_kl": AgreementTask,
    "cosine": EmbeddingTask,
    "probe_accuracy": EmbeddingTask,
    "perplexity": CausalLMTask,
    "token_agreement": CausalLMTask,
    "next_token_accuracy": CausalLMTask,
}
_ALIASES = {"accuracy": "top1", "ppl": "perplexity", "probe": "probe_accuracy", "agreement": "token_agreement"}


def register_metric(metric: str, task_factory: Callable[[], Task]) -> None:
    """Makes ``task_for_metric(metric)`` build ``task_factory()``."""
    _METRIC_TASKS[metric] = task_factory


def list_metrics() -> Tuple[str, ...]:
    return tuple(sorted(set(_METRIC_TASKS) | set(_ALIASES)))


def task_for_metric(metric: str, **params: Any) -> Tuple[Task, str]:
    """The task that computes ``metric`` and the canonical metric name.

    Args:
        metric: A built-in metric name, or ``module:function`` / ``file.py:function``.
        **params: Passed to the task's constructor (e.g. ``pooling="cls"``).

    Raises:
        UnknownMetricError: naming the metric and listing the known ones.
    """
    if ":" in metric:
        task = FunctionTask(metric)
        return task, task.metric_name
    name = _ALIASES.get(metric.strip().lower(), metric.strip().lower())
    factory = _METRIC_TASKS.get(name)
    if factory is None:
        raise UnknownMetricError(
            f"unknown metric {metric!r}; built-in metrics: {', '.join(list_metrics())} (or a module:function)"
        )
    if params:
        accepted = inspect.signature(factory).parameters
        unknown = set(params) - set(accepted)
        if unknown:
            raise UnknownMetricError(f"metric {metric!r} takes no parameter(s) {sorted(unknown)}")
    return factory(**params), name


def cast_floating(inputs: Any, dtype: torch.dtype) -> Any:
    """Casts every floating-point tensor of a (nested) input to ``dtype``; integer ids stay."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: cast_floating(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(cast_floating(v, dtype) for v in inputs)
    return inputs


def batches_of(data: Iterable[Any], max_batches: Optional[int]) -> list:
    """Materializes up to ``max_batches`` batches once, so every precision sees the same data."""
    out = []
    for batch in data:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(batch)
    return out
