"""Per-layer sensitivity ranking by the task metric, made cheap by an SQNR proxy.

Two ways to measure one layer's sensitivity:

* "one layer alone": quantize only that layer, everything else in float, and
  measure the drop. Cheap to reason about, but it ignores that in the deployed
  model every other layer is INT8 too, so noise from several layers compounds.
* "everything but one" (leave-one-out): quantize every layer except that one and
  measure how much of the metric comes back.

quantlab uses **everything but one**: it answers the question mixed precision
asks ("if I keep this layer in FP16 and the rest in INT8, what do I get back?")
in the configuration that will actually be deployed, so the ranking feeds
:mod:`quantlab.evaluation.autoprecision` directly. The SQNR proxy, on the other
hand, is a one-layer-alone measurement (each layer's local output SQNR on FP32
inputs, averaged per row, i.e. per token or per sample; one pass over a few
batches, see :mod:`quantlab.evaluation.layers`): cheap, and a good ordering of
candidates. Averaging per row matters: the global SQNR of a layer whose range
is set by a few huge activations looks fine while every other token is zeroed.

Cost control: the metric is evaluated only for the ``top_k`` layers with the
lowest proxy SQNR, on a subset of the eval batches, so that proxy + FP32 and
INT8 baselines + ``top_k`` leave-one-out evaluations stay within
``budget_passes`` (default 3) full eval passes, counted in batch forwards. Layers
not evaluated keep their proxy order after the evaluated ones.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from torch import nn

from quantlab.attach import iter_quantizers, quantization_disabled
from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.evaluate import evaluate, evaluate_reference
from quantlab.evaluation.layers import PROXY_FIELDS, LayerError, layer_errors
from quantlab.evaluation.noise import metric_noise
from quantlab.evaluation.ranking import ranking_agreement
from quantlab.evaluation.tasks import Task

METHOD = "everything_but_one"
#: Batch forwards of the proxy pass, per batch: FP32 forward, INT8 forward, each layer alone.
PROXY_FORWARDS_PER_BATCH = 3


@contextlib.contextmanager
def layers_in_float(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Temporarily switches off the input and weight quantizers of the named layers."""
    wanted = set(names)
    unknown = wanted - {ref.module_name for ref in iter_quantizers(model)}
    if unknown:
        raise EvaluationError(f"layer(s) {', '.join(sorted(unknown)[:5])} have no quantizers in {type(model).__name__}")
    with quantization_disabled(model, wanted):
        yield model


def improvement(task: Task, metric: str, value: float, baseline: float) -> float:
    """How much better ``value`` is than ``baseline`` (positive = better), in metric units."""
    if math.isinf(value) and math.isinf(baseline) and value == baseline:
        return 0.0
    return value - baseline if task.higher_is_better(metric) else baseline - value


PROXIES = PROXY_FIELDS


def proxy_value(error: LayerError, key: Optional[str] = None) -> float:
    """A layer's proxy SQNR (dB): ``key``, or :attr:`LayerError.proxy_db` by default."""
    if key is None:
        return error.proxy_db
    if key not in PROXIES:
        raise EvaluationError(f"unknown proxy {key!r}; choose one of {', '.join(PROXIES)}")
    value = getattr(error, key)
    return error.proxy_db if value is None else value


def proxy_order(errors: Sequence[LayerError], *, key: Optional[str] = None) -> List[str]:
    """Layer names, most suspicious (lowest proxy SQNR) first."""
    return [e.layer for e in sorted(errors, key=lambda e: proxy_value(e, key))]


@dataclasses.dataclass
class LayerSensitivity:
    """One layer's place in the ranking.

    Attributes:
        layer: Module name.
        proxy_sqnr_db: The layer's proxy SQNR: local, mean per row (lower = more suspicious).
        value: The metric with only this layer in float (None if not evaluated).
        sensitivity: Metric recovered by keeping this layer in float, vs all INT8
            (positive = the layer hurts; None if not evaluated).
        rank: 1 = most sensitive.
        n: Samples (or tokens) the recovery was measured on (None if not evaluated).
        p_value: Paired test of this layer-in-float model against all-INT8 on the same
            samples (McNemar exact for proportions, paired t for means; :mod:`.noise`).
        within_noise: p >= 0.05: the recovery cannot be told from noise on these samples.
    """

    layer: str
    proxy_sqnr_db: Optional[float]
    value: Optional[float]
    sensitivity: Optional[float]
    rank: int
    n: Optional[int] = None
    p_value: Optional[float] = None
    within_noise: Optional[bool] = None


@dataclasses.dataclass
class SensitivityResult:
    """A sensitivity ranking and what it cost.

    Attributes:
        metric: The task metric ranked by.
        method: ``"everything_but_one"``.
        fp32: FP32 metric on the subset.
        baseline: All-INT8 metric on the subset.
        layers: Ranked, most sensitive first.
        subset_batches: Eval batches each candidate was evaluated on.
        total_batches: Batches in one full eval pass.
        cost_passes: Batch forwards spent / ``total_batches``.
        seconds: Wall time.
        layer_errors: The proxy measurements.
    """

    metric: str
    method: str
    fp32: float
    baseline: float
    layers: List[LayerSensitivity]
    subset_batches: int
    total_batches: int
    cost_passes: float
    seconds: float
    layer_errors: List[LayerError] = dataclasses.field(default_factory=list, repr=False)

    def order(self) -> List[str]:
        return [entry.layer for entry in self.layers]

    @property
    def evaluated(self) -> List[LayerSensitivity]:
        return [entry for entry in self.layers if entry.sensitivity is not None]

    def to_rows(self, calibrator: Optional[str]) -> List[Dict[str, Any]]:
        """Rows for :meth:`quantlab.store.RunStore.add_layer_stats`."""
        by_layer = {e.layer: e for e in self.layer_errors}
        rows = []
        for entry in self.layers:
            error = by_layer.get(entry.layer)
            rows.append({
                "calibrator": calibrator,
                "layer": entry.layer,
                "sqnr_db": error.sqnr_db if error else None,
                "cosine": error.cosine if error else None,
                "local_sqnr_db": error.local_sqnr_db if error else None,
                "local_cosine": error.local_cosine if error else None,
                "row_sqnr_db": error.row_sqnr_db if error else None,
                "local_row_sqnr_db": error.local_row_sqnr_db if error else None,
                "sensitivity": entry.sensitivity,
                "rank": entry.rank,
                "sensitivity_n": entry.n,
                "sensitivity_p": entry.p_value,
                "sensitivity_within_noise": entry.within_noise,
            })
        return rows


def plan_budget(num_batches: int, num_layers: int, *, budget_passes: float, top_k: Optional[int], subset_fraction: float, proxy_batches: int) -> Dict[str, int]:
    """Chooses candidates ``top_k`` and ``subset`` batches so the total stays within budget.

    Counted in batch forwards: proxy ``PROXY_FORWARDS_PER_BATCH * proxy_batches``,
    then ``subset`` each for the FP32 and INT8 baselines and every candidate.
    """
    budget = int(math.floor(budget_passes * num_batches))
    proxy = PROXY_FORWARDS_PER_BATCH * proxy_batches
    left = budget - proxy
    if top_k is not None:
        top_k = max(0, min(int(top_k), num_layers))
        subset = min(num_batches, left // (top_k + 2)) if left > 0 else 0
        while top_k > 0 and subset < 1:
            top_k -= 1
            subset = min(num_batches, left // (top_k + 2)) if left > 0 else 0
    else:
        subset = max(1, min(num_batches, int(round(subset_fraction * num_batches))))
        top_k = max(0, min(num_layers, left // subset - 2)) if left > 0 else 0
    if top_k == 0:
        subset = 0
    return {"top_k": top_k, "subset": subset, "proxy_batches": proxy_batches, "budget": budget}


def rank_layers(
    fp32_model: nn.Module,
    quant_model: nn.Module,
    task: Task,
    batches: Sequence[Any],
    *,
    metric: str,
    top_k: Optional[int] = None,
    budget_passes: float = 3.0,
    subset_fraction: float = 0.25,
    proxy_batches: Optional[int] = None,
    errors: Optional[Sequence[LayerError]] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> SensitivityResult:
    """Ranks quantized layers by the metric recovered when each alone stays in float.

    Args:
        fp32_model: The floating-point model.
        quant_model: Its calibrated quantized copy (fake-quantizing).
        task: The task; its FP32 reference is reset to the subset.
        batches: The full eval batches (one pass = ``len(batches)``).
        metric: Metric to rank by.
        top_k: Candidates to evaluate (default: as many as the budget allows).
        budget_passes: Maximum cost in full eval passes (including the proxy).
        subset_fraction: Share of the eval batches per candidate when ``top_k`` is None.
        proxy_batches: Batches for the SQNR proxy (default ``min(2, len(batches))``).
        errors: Proxy measurements already taken (e.g. by compare) for this model.
        progress: ``progress(stage, done, total)``.

    Raises:
        EvaluationError: no quantized layer, no batch, or the metric is not produced.
    """
    start = time.perf_counter()
    num_batches = len(batches)
    if num_batches == 0:
        raise EvaluationError("sensitivity needs eval batches")
    proxy_batches = min(num_batches, proxy_batches if proxy_batches is not None else (2 if num_batches >= 4 else 1))
    if errors is None:
        errors = layer_errors(fp32_model, quant_model, batches[:proxy_batches], inputs_of=task.inputs,
                              progress=(lambda n: progress("proxy", n, proxy_batches)) if progress else None)
    if not errors:
        raise EvaluationError("the quantized model has no quantizing layer to rank")
    order = proxy_order(errors)
    proxy = {e.layer: proxy_value(e) for e in errors}
    plan = plan_budget(num_batches, len(order), budget_passes=budget_passes, top_k=top_k,
                       subset_fraction=subset_fraction, proxy_batches=proxy_batches)
    spent = PROXY_FORWARDS_PER_BATCH * proxy_batches
    subset = batches[: plan["subset"]] if plan["subset"] else batches[:1]
    fp32 = evaluate_reference(fp32_model, task, subset).metrics
    baseline_pass = evaluate(quant_model, task, subset)
    baseline = baseline_pass.metrics
    baseline_scores = task.sample_scores(baseline_pass.state).get(metric)
    noise = {}
    spent += 2 * len(subset)
    if metric not in baseline:
        raise EvaluationError(f"the task does not produce metric {metric!r} (it gives {', '.join(baseline)})")
    measured: Dict[str, float] = {}
    values: Dict[str, float] = {}
    candidates = order[: plan["top_k"]]
    for i, layer in enumerate(candidates):
        with layers_in_float(quant_model, [layer]):
            candidate = evaluate(quant_model, task, subset)
        value = candidate.metrics[metric]
        scores = task.sample_scores(candidate.state).get(metric)
        if scores is not None:
            noise[layer] = metric_noise(scores, baseline_scores)
        spent += len(subset)
        values[layer] = value
        measured[layer] = improvement(task, metric, value, baseline[metric])
        if progress is not None:
            progress("leave-one-out", i + 1, len(candidates))
    # Evaluated layers by recovered metric (ties: proxy order), then the rest in proxy order.
    ranked = sorted(candidates, key=lambda n: (-measured[n], order.index(n))) + order[len(candidates):]
    layers = [
        LayerSensitivity(layer=n, proxy_sqnr_db=proxy.get(n), value=values.get(n), sensitivity=measured.get(n), rank=i + 1,
                         n=noise[n].n if n in noise else None, p_value=noise[n].p_value if n in noise else None,
                         within_noise=noise[n].within_noise if n in noise else None)
        for i, n in enumerate(ranked)
    ]
    return SensitivityResult(
        metric=metric,
        method=METHOD,
        fp32=fp32[metric],
        baseline=baseline[metric],
        layers=layers,
        subset_batches=len(subset),
        total_batches=num_batches,
        cost_passes=spent / num_batches,
        seconds=time.perf_counter() - start,
        layer_errors=list(errors),
    )


def full_ranking(
    quant_model: nn.Module,
    task: Task,
    batches: Sequence[Any],
    *,
    metric: str,
    layers: Sequence[str],
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> Dict[str, float]:
    """The expensive reference: everything-but-one sensitivity of EVERY given layer.

    Costs ``len(layers) + 1`` passes over ``batches``; used to measure how good the
    proxy ordering is (:func:`proxy_agreement`), not in normal runs. The task's
    reference must already be set for ``batches``.
    """
    baseline = evaluate(quant_model, task, batches).metrics[metric]
    out = {}
    for i, layer in enumerate(layers):
        with layers_in_float(quant_model, [layer]):
            out[layer] = improvement(task, metric, evaluate(quant_model, task, batches).metrics[metric], baseline)
        if progress is not None:
            progress("full ranking", i + 1, len(layers))
    return out


def proxy_agreement(errors: Sequence[LayerError], full: Dict[str, float], *, top_k: int = 5, key: Optional[str] = None) -> Dict[str, float]:
    """Spearman / Kendall / top-k overlap between an SQNR proxy and the full metric ranking."""
    proxy = {e.layer: -proxy_value(e, key) for e in errors}  # lower SQNR = more sensitive
    return ranking_agreement(proxy, full, top_k=top_k)
