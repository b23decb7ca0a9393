"""SmoothQuant (Xiao et al. 2023) as a transform: per-channel factors that move
activation outliers into the weights, folded into the producing LayerNorm /
RMSNorm or Linear only where that is exact, so the exported graph has no extra op.

Per fold group (a producer and the Linears consuming its output, found on the
calibration data by :mod:`quantlab.algorithms._smooth_graph`): ``s_j =
max|X_j|^alpha / max|W[:, j]|^(1 - alpha)``; alpha is searched per group on a
grid (lowest quantized output error of the group's Linears with the config's
weight and input specs), or fixed with ``{"alpha": 0.5}``.

Parameters (``algorithm_params["smoothquant"]``):
    alpha: fixed alpha in [0, 1] (default: searched per group).
    grid: the alphas searched (default 0.0, 0.1, ..., 1.0).
    samples: calibration rows (tokens) kept per Linear input for the search (default 256).
    tolerance: largest relative change of the model's FP32 output allowed after
        folding (default 1e-3); beyond it every fold is undone and an error raised.
    untie: True: a consumer Linear whose weight is shared with another module (a
        language model's lm_head tied to the token embedding) gets its own copy of
        the weight, so its group (final norm -> lm_head) can be folded exactly; the
        copy is kept only where a fold happened, and the report's ``untie`` gives
        its size (one more weight in the float model: ``extra_parameters``,
        ``extra_bytes``; a checkpoint already stores both names and the INT8 ONNX
        export already gives lm_head its own INT8 weight, so those do not grow). Default False.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantlab.algorithms._smooth_graph import (
    ForwardRecorder,
    Producer,
    candidate_producers,
    channel_map,
    probe_factors,
    run_recorded,
)
from quantlab.algorithms._smooth_search import Consumer, InputStatistics, fold, search_alpha, smoothing_factors, channel_maxima
from quantlab.algorithms._untie import finish as finish_untie, parameter_holders, rebuild_untied, retie, untie_weight
from quantlab.algorithms.base import AlgorithmContext, AlgorithmError, register_algorithm
from quantlab.attach import _selected
from quantlab.config import QuantConfig, int8_config
from quantlab.registry import lookup_quantizable

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))
PARAMS = ("alpha", "grid", "samples", "tolerance", "untie")


@dataclasses.dataclass
class _Group:
    producer: Producer
    consumers: List[str]
    maps: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _params(params: Mapping[str, Any]) -> Tuple[Optional[float], Tuple[float, ...], int, float, bool]:
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise AlgorithmError(f"smoothquant: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMS)}")
    alpha = params.get("alpha")
    if isinstance(alpha, bool):  # float(True) is 1.0: "alpha=true" must not pass for alpha 1
        raise AlgorithmError(f"smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
    if alpha is not None:
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise AlgorithmError(f"smoothquant: alpha must be a number in [0, 1], got {alpha!r}") from None
        if not 0.0 <= alpha <= 1.0:
            raise AlgorithmError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    grid = params.get("grid", DEFAULT_GRID)
    if isinstance(grid, bool) or (isinstance(grid, (list, tuple)) and any(isinstance(a, bool) for a in grid)):
        raise AlgorithmError(f"smoothquant: grid must be a list of numbers in [0, 1], got {grid!r}")
    try:
        grid = tuple(float(a) for a in ([grid] if isinstance(grid, (int, float)) else grid))
    except (TypeError, ValueError):
        raise AlgorithmError(f"smoothquant: grid must be a list of numbers in [0, 1], got {grid!r}") from None
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
        raise AlgorithmError(f"smoothquant: grid must be a non-empty list of numbers in [0, 1], got {list(grid)}")
    samples = params.get("samples", 256)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 16:
        raise AlgorithmError(f"smoothquant: samples must be an integer >= 16, got {samples!r}")
    tolerance = params.get("tolerance", 1e-3)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < math.inf:
        raise AlgorithmError(f"smoothquant: tolerance must be a positive number, got {tolerance!r}")
    untie = params.get("untie", False)
    if not isinstance(untie, bool):
        raise AlgorithmError(f"smoothquant: untie must be true or false, got {untie!r}")
    return alpha, grid, samples, float(tolerance), untie


def _one_sample(inputs: Tuple[tuple, dict]) -> Tuple[tuple, dict]:
    """The first sample of a batch when every input tensor shares the batch size (else the batch)."""
    sizes = {t.shape[0] for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim() >= 1}
    if len(sizes) != 1 or next(iter(sizes)) <= 1:
        return inputs
    return pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() >= 1 else t, inputs)


def _relative_change(new: Optional[torch.Tensor], old: Optional[torch.Tensor]) -> float:
    if new is None or old is None or new.shape != old.shape:
        return 0.0 if new is None and old is None else float("inf")
    return float((new.double() - old.double()).abs().max() / old.double().abs().max().clamp_min(1e-30))


@register_algorithm("smoothquant", "transform", 20, needs_data=True, rebuild=rebuild_untied, check=_params,
                    params={"alpha": None, "grid": list(DEFAULT_GRID), "samples": 256, "tolerance": 1e-3, "untie": False},
                    description="SmoothQuant: per-channel factors move activation outliers into the weights, "
                                "folded into the preceding norm or linear where exact (alpha searched per group)")
def smoothquant(model: nn.Module, context: AlgorithmContext) -> Dict[str, Any]:
    """Smooths ``model`` in place (its FP32 function is kept); returns what it did."""
    fixed_alpha, grid, rows, tolerance, untie = _params(context.params)
    if context.forward_loop is None:
        raise AlgorithmError("smoothquant needs calibration data (a forward loop) to measure activation ranges")
    config: QuantConfig = context.config if isinstance(context.config, QuantConfig) else int8_config()
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    producers = candidate_producers(model)
    if not any(p.kind == "linear" for p in producers):
        raise AlgorithmError(f"smoothquant: {type(model).__name__} has no nn.Linear to smooth")
    modules = dict(model.named_modules())

    # 1. One calibration pass: dataflow on the first batch, per-channel maxima and row samples throughout.
    recorder = ForwardRecorder(model, producers)
    statistics: Dict[str, InputStatistics] = {}
    handles = []

    def stats_hook(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                paused, recorder.tracker.paused = recorder.tracker.paused, True
                try:
                    statistics.setdefault(name, InputStatistics(rows)).update(x)
                finally:
                    recorder.tracker.paused = paused
        return hook

    def prune_after_first_call(module, args, output):
        if recorder.root_calls == 1:  # only Linears fed by a producer need statistics from here on
            trace = recorder.result()
            wanted = {c for p, cs in trace.consumers.items() if not trace.blockers.get(p) for c in cs}
            for name, handle in list(stat_handles.items()):
                if name not in wanted:
                    handle.remove()
                    statistics.pop(name, None)

    stat_handles = {name: m.register_forward_pre_hook(stats_hook(name), with_kwargs=True)
                    for name, m in modules.items() if isinstance(m, nn.Linear)}
    recorder.install()
    handles.append(model.register_forward_hook(prune_after_first_call, always_call=True))
    try:
        with torch.no_grad():
            context.forward_loop(model)
    finally:
        recorder.remove()
        for handle in handles + list(stat_handles.values()):
            handle.remove()
    if recorder.root_calls == 0 or recorder.inputs is None:
        raise AlgorithmError("smoothquant: the calibration data is empty (no batch reached the model)")
    seconds["statistics"] = time.perf_counter() - start
    trace = recorder.result()

    # 2. Exact fold groups: every use of the producer's output ends in Linears, through per-channel linear ops.
    holders = parameter_holders(model)
    untied: Dict[str, List[Dict[str, Any]]] = {}  # producer -> its consumers' unties (undone unless folded)
    groups: List[_Group] = []
    skipped: List[Dict[str, str]] = []
    unreached: List[str] = []
    for name in trace.order:
        producer = next(p for p in producers if p.name == name)
        consumers = trace.consumers.get(name, [])
        blockers = trace.blockers.get(name, [])
        if not consumers:
            if producer.kind == "norm":
                skipped.append({"producer": name, "reason": f"its output reaches no Linear through per-channel linear ops (uses: {', '.join(blockers) or 'none'})"})
            else:
                unreached.append(f"{name}: output used by {', '.join(blockers) or 'nothing'}")
            continue
        reason = ""
        if blockers:
            reason = f"its output is also used by {', '.join(blockers)} (not a per-channel linear use): folding would change the model"
        elif any(trace.calls.get(n, 0) != 1 for n in [name] + consumers):
            reason = "the producer or a consumer runs more than once per forward"
        elif producer.kind == "linear" and type(modules[name]).forward is not nn.Linear.forward:
            reason = "the producer Linear has its own forward (its output may not be x W^T + b)"
        elif not any(lookup_quantizable(modules[c]) is not None and _selected(c, config) for c in consumers):
            reason = "none of its consumers is quantized by the config"
        elif any(len(holders.get(id(p), ())) > 1 for p in modules[name].parameters(recurse=False)):
            reason = "the producer's weight is shared (tied) with another module"
        else:
            tied = [c for c in consumers if len(holders.get(id(modules[c].weight), ())) > 1]
            if tied and not untie:
                reason = ("a weight is shared (tied) with another module: " + ", ".join(tied)
                          + " (smoothquant.untie=true gives it its own copy)")
            elif tied:  # an equal copy: the function is unchanged, and the fold no longer reaches the other holder
                untied[name] = [untie_weight(model, c, holders) for c in tied]
        if reason:
            skipped.append({"producer": name, "consumers": ", ".join(consumers), "reason": reason})
        else:
            groups.append(_Group(producer, consumers))

    # 3. Numeric probe on one sample: each producer's channels scaled by distinct factors at once (consumer
    #    inputs are reset to the reference, so the groups do not disturb each other): channel maps + linearity.
    start = time.perf_counter()
    probe_inputs = _one_sample(recorder.inputs)
    consumer_names = sorted({c for g in groups for c in g.consumers})
    norm_names = [g.producer.name for g in groups if g.producer.kind == "norm"]
    try:
        reference = run_recorded(model, probe_inputs, record_inputs=consumer_names, record_io=norm_names)
    except Exception:  # the model does not accept a one-sample slice: use the whole first batch
        probe_inputs = recorder.inputs
        try:
            reference = run_recorded(model, probe_inputs, record_inputs=consumer_names, record_io=norm_names)
        except Exception as exc:
            raise AlgorithmError(f"smoothquant: the model failed when called again with its first calibration batch "
                                 f"({type(exc).__name__}: {exc})") from exc
    factors = {g.producer.name: probe_factors(g.producer.channels, seed=i) for i, g in enumerate(groups)}
    probed = run_recorded(model, probe_inputs, record_inputs=consumer_names,
                          scale_outputs={n: f.to(torch.float32) for n, f in factors.items()},
                          replace_inputs={c: reference["in:" + c] for c in consumer_names})
    valid: List[_Group] = []
    for group in groups:
        why = ""
        for c in group.consumers:
            before, after = reference.get("in:" + c), probed.get("in:" + c)
            if before is None or after is None:
                why = f"{c} did not run on the probe sample"
                break
            mapping, why = channel_map(before, after, factors[group.producer.name])
            if mapping is None:
                why = f"{c}: {why}"
                break
            group.maps[c] = mapping
        if why:
            skipped.append({"producer": group.producer.name, "consumers": ", ".join(group.consumers), "reason": why})
        else:
            valid.append(group)
    seconds["probe"] = time.perf_counter() - start
    if not valid:
        _retie(model, untied, keep=())
        reasons = "; ".join([f"{s['producer']}: {s['reason']}" for s in skipped[:6]] + unreached[:6 - min(6, len(skipped))])
        reasons = reasons or "no LayerNorm/RMSNorm or Linear output feeds a Linear"
        raise AlgorithmError(f"smoothquant: nothing in {type(model).__name__} can be smoothed with an exact fold ({reasons})")

    # 4. Per group: alpha (searched or fixed), fold, check the producer's fold numerically.
    start = time.perf_counter()
    weight_spec = dataclasses.replace(config.weight, axis=0) if config.weight.per_channel else config.weight
    backups: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    done: List[Dict[str, Any]] = []

    def backup(module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            backups.setdefault(id(p), (p, p.detach().clone()))

    def restore(params: Optional[List[torch.Tensor]] = None) -> None:
        with torch.no_grad():
            for key, (p, saved) in list(backups.items()):
                if params is None or any(p is q for q in params):
                    p.copy_(saved)

    for group in valid:
        consumers = [Consumer(c, modules[c], group.maps[c], statistics[c].sample(), statistics[c].amax,
                              lookup_quantizable(modules[c]) is not None and _selected(c, config))
                     for c in group.consumers]
        channels = group.producer.channels
        if fixed_alpha is None:
            alpha, s, losses = search_alpha(consumers, channels, grid, weight_spec, config.input)
        else:
            x_max, w_max = channel_maxima(consumers, channels)
            alpha, s, losses = fixed_alpha, smoothing_factors(x_max, w_max, fixed_alpha), {}
        entry: Dict[str, Any] = {"producer": group.producer.name, "kind": group.producer.kind,
                                 "consumers": group.consumers, "alpha": alpha}
        if losses:
            entry["loss_none"] = losses["none"]
            entry["loss"] = min(losses.values())
        before = max(float(c.amax.max()) for c in consumers)
        if alpha is None:
            entry["act_max"] = before
            done.append(entry)
            continue
        producer_module = modules[group.producer.name]
        for module in [producer_module] + [c.module for c in consumers]:
            backup(module)
        fold(producer_module, group.producer.kind, consumers, s)
        if group.producer.kind == "norm":  # a norm's input is never a consumer's, so the recorded one still holds
            with torch.no_grad():
                x_in = reference["io_in:" + group.producer.name]
                expected = reference["io_out:" + group.producer.name] / s.to(x_in.device)
                exact = _relative_change(producer_module(x_in), expected) <= 1e-4
        else:  # F.linear: dividing output rows by s is exact
            exact = True
        if not exact:
            restore(list(producer_module.parameters(recurse=False)) + [c.module.weight for c in consumers])
            skipped.append({"producer": group.producer.name, "consumers": ", ".join(group.consumers),
                            "reason": "its output is not x * weight (+ bias) per channel: the fold is not exact"})
            continue
        entry["act_max"] = before
        entry["act_max_smoothed"] = max(float((c.amax.to(s.device) / s[c.mapping.to(s.device)]).max()) for c in consumers)
        done.append(entry)
    seconds["search_and_fold"] = time.perf_counter() - start

    # 5. The model must compute the same function.
    final = run_recorded(model, probe_inputs)
    change = _relative_change(final["output"], reference["output"])
    if not change <= tolerance:
        restore()
        _retie(model, untied, keep=())
        raise AlgorithmError(f"smoothquant: the folded model's FP32 output changed by {change:.3g} (relative, > tolerance "
                             f"{tolerance:g}); every fold was undone")
    smoothed = [d for d in done if d["alpha"] is not None]
    kept = _retie(model, untied, keep={d["producer"] for d in smoothed})
    return {
        "alpha": "searched" if fixed_alpha is None else fixed_alpha,
        "grid": list(grid) if fixed_alpha is None else None,
        "groups_smoothed": len(smoothed),
        "linears_smoothed": sum(len(d["consumers"]) for d in smoothed),
        "groups": done,
        "skipped": skipped,
        "linears_feeding_no_linear": len(unreached),
        "fp32_relative_change": change,
        "untie": finish_untie(model, kept),
        "seconds": seconds,
    }


def _retie(model: nn.Module, untied: Mapping[str, List[Dict[str, Any]]], keep: Any) -> List[Dict[str, Any]]:
    """Gives back the shared weight to consumers untied for a group that was not folded; returns the kept unties."""
    kept = []
    for producer, entries in untied.items():
        for entry in entries:
            if producer in keep:
                kept.append(entry)
            else:
                retie(model, entry)
    return kept
