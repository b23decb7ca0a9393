"""Compare FP32, FP16 and INT8 (every calibrator) on the same eval data, in one call.

* One statistics pass (:func:`quantlab.ptq.run_ptq`) is shared by all calibrators.
* FP32 runs first and becomes the reference (embedding cosine, token agreement,
  linear probe); it also validates the task, metric and data BEFORE anything else
  (``on_reference`` then fires: a job records its run there, so bad input leaves
  no record).
* FP16 runs a ``model.half()`` copy with floating-point inputs cast to half
  (integer token ids stay integers); on a CPU this is slow but correct.
* INT8 runs a fake-quantized copy in PyTorch, once per calibrator. ONNX Runtime
  INT8 execution lives in :mod:`quantlab.runtimes`; it plugs in through
  ``extra_candidates`` (any callable taking the model's inputs), evaluated on the
  same batches and reported the same way.
* Per-layer SQNR / cosine per calibrator on a few batches (:mod:`.layers`).
* Every metric row carries n, a 95% interval and a paired test against FP32 on
  the same samples (:mod:`.noise`); every configuration gets an output-fidelity
  row against FP32's outputs (:mod:`.fidelity`: max abs / relative error, cosine,
  KL of the softmax, top-1 agreement), on the first eval batches up to
  :data:`FIDELITY_MAX_ELEMENTS` kept FP32 output values.
* With PTQ algorithms in the config (``config.algorithms``), INT8 runs once per
  prefix of the pipeline (``ptq``, ``ptq+cle``, ``ptq+cle+bias-correction``, ...; not
  one that lacks an algorithm another in it requires): each is its own row per
  calibrator (``source``), so the user sees what each stage buys; :attr:`CompareResult.variants` keeps each one's PTQ result and model.

This is measurement only: nothing is recorded or written. The compare job
(:func:`quantlab.jobs.compare.run_compare`) records the rows as they come (the
``on_rows`` / ``on_layers`` callbacks) and writes the run folder.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from quantlab.algorithms import check_params, parse_algorithms
from quantlab.api import load_scales
from quantlab.attach import is_quantized
from quantlab.config import QuantConfig, int8_config
from quantlab.errors import ConfigError
from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.evaluate import Evaluation, evaluate, evaluate_reference
from quantlab.evaluation.fidelity import Fidelity, FidelityAccumulator
from quantlab.evaluation.layers import LayerError, layer_errors
from quantlab.evaluation.noise import MetricNoise, SampleScores, metric_noise
from quantlab.evaluation.tasks import Task, batches_of, task_for_metric
from quantlab.pipeline.refine import restore_refinable_state
from quantlab.ptq import PTQResult, parse_calibrators, run_ptq

PRECISIONS = ("fp32", "fp16", "int8")
Progress = Callable[[str, int, int], None]
#: ``on_rows(rows, fraction)``: the rows of one evaluated configuration and the share of the work done.
OnRows = Callable[[List["ResultRow"], float], None]
#: FP32 output values kept for the output-fidelity comparison (the first batch is always kept).
FIDELITY_MAX_ELEMENTS = 1 << 25


@dataclasses.dataclass
class Candidate:
    """Something to evaluate besides the built-in precisions (e.g. an ONNX Runtime INT8 session).

    Attributes:
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        calibrator: Calibrator whose scales it uses, or None.
        source: ``"ptq"``, ``"qat"`` or ``"mixed"``.
        model: A module or any callable taking the model's inputs.
        input_dtype: Cast floating-point inputs to this dtype first.
        device: Device for the inputs of a non-module callable.
    """

    precision: str
    calibrator: Optional[str]
    source: str
    model: Callable[..., Any]
    input_dtype: Optional[torch.dtype] = None
    device: Optional[torch.device] = None


@dataclasses.dataclass
class _Configuration:
    """The configuration a row describes (the first fields of every row)."""

    precision: str
    calibrator: Optional[str]
    source: str


@dataclasses.dataclass
class _MetricValue(_Configuration):
    """A metric's value for a configuration, its difference to FP32 and the time it took."""

    metric: str
    value: float
    delta: Optional[float]
    seconds: Optional[float]


# A row is its configuration followed by the fields of what was measured, declared once where
# they are computed (MetricNoise, Fidelity). dataclasses collects fields in reverse MRO order,
# so the measurement base goes FIRST in the bases: its fields then come after the configuration's,
# and positional construction keeps the order precision, calibrator, source, ...


@dataclasses.dataclass
class ResultRow(MetricNoise, _MetricValue):
    """One metric of one precision/calibrator (the run store's ``results`` row): precision, calibrator,
    source, metric, value, delta, seconds, then the fields of :class:`quantlab.evaluation.noise.MetricNoise`."""


@dataclasses.dataclass
class FidelityRow(Fidelity, _Configuration):
    """Output fidelity of one precision/calibrator against FP32 (the run store's ``fidelity`` row):
    precision, calibrator, source, then the fields of :class:`quantlab.evaluation.fidelity.Fidelity`."""


@dataclasses.dataclass
class Variant:
    """One INT8 pipeline of a comparison: PTQ with a prefix of the config's algorithms.

    Attributes:
        source: Its rows' source, ``"ptq"`` or ``"ptq+cle+..."``.
        algorithms: The algorithms it ran, in pipeline order.
        ptq: Its scales per calibrator and the algorithms' reports.
        model: The quantized copy it ran on (it holds the last calibrator's refined
            weights; ``ptq.refined_weights`` the others'); kept only where algorithms
            changed the weights (a checkpoint is written from it).
    """

    source: str
    algorithms: Tuple[str, ...]
    ptq: PTQResult
    model: Optional[nn.Module] = None


def variant_source(algorithms: Sequence[str]) -> str:
    """``()`` -> ``"ptq"``; ``("cle", "adaround")`` -> ``"ptq+cle+adaround"``."""
    return "+".join(("ptq",) + tuple(algorithms))


def is_ptq_source(source: str) -> bool:
    """Whether a row comes from PTQ (plain or with algorithms)."""
    return source == "ptq" or source.startswith("ptq+")


@dataclasses.dataclass
class CompareResult:
    """Everything a comparison produced.

    Attributes:
        rows: Every metric of every evaluated precision/calibrator.
        metric: The primary metric.
        higher_is_better: Direction of the primary metric.
        task: The task (its FP32 reference set).
        ptq: Scales per calibrator and statistics-pass timing (None without INT8).
        layer_errors: Per-layer SQNR/cosine per calibrator.
        run_id: Run store id (set by the compare job; None when not recorded).
        run_dir: The run folder (set by the compare job; None when not written).
        eval_batches: Number of eval batches used.
        settings: What was measured and how (metric, task, calibrators, precisions,
            batch counts, quantization config): the compare job records it as the run's config.
        sparsity: What the "2:4 + INT8" rows did (pruning reports, GPU speed): a
            :class:`quantlab.sparsity.compare.SparseOutcome`, set by the compare job when
            asked for those rows (None otherwise).
        variants: Every INT8 pipeline by source (one, ``"ptq"``, without algorithms);
            ``ptq`` is the last (all the algorithms).
    """

    rows: List[ResultRow]
    metric: str
    higher_is_better: bool
    task: Task
    ptq: Optional[PTQResult]
    layer_errors: Dict[str, List[LayerError]]
    run_id: Optional[str]
    run_dir: Optional[Path]
    eval_batches: int
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)
    sparsity: Any = None
    variants: Dict[str, Variant] = dataclasses.field(default_factory=dict)
    fidelity: List[FidelityRow] = dataclasses.field(default_factory=list)
    deployment: List[Any] = dataclasses.field(default_factory=list)
    #: The model inputs of the first eval batch (what a deployment measurement exports and times).
    example_inputs: Any = dataclasses.field(default=None, repr=False)

    def value(self, precision: str, calibrator: Optional[str] = None, metric: Optional[str] = None) -> float:
        """The value of ``metric`` (default primary) for a precision (and calibrator)."""
        metric = metric or self.metric
        for row in self.rows:
            if row.precision == precision and row.calibrator == calibrator and row.metric == metric:
                return row.value
        raise KeyError(f"no {metric} result for {precision}" + (f" / {calibrator}" if calibrator else ""))

    def primary_rows(self) -> List[ResultRow]:
        return [r for r in self.rows if r.metric == self.metric]

    @property
    def best_calibrator(self) -> Optional[str]:
        """The INT8 calibrator with the best primary metric."""
        best = self.best_row
        return best.calibrator if best is not None else None

    @property
    def best_row(self) -> Optional[ResultRow]:
        """The INT8 PTQ row (any algorithm prefix) with the best primary metric; the first on ties."""
        int8 = [r for r in self.primary_rows() if r.precision == "int8" and r.source in self.variants and r.calibrator]
        if not int8:
            int8 = [r for r in self.primary_rows() if r.precision == "int8" and r.source == "ptq" and r.calibrator]
        if not int8:
            return None
        sign = 1.0 if self.higher_is_better else -1.0
        return max(int8, key=lambda r: sign * r.value)


def parse_precisions(precisions: Union[str, Sequence[str]]) -> List[str]:
    """``"fp32,fp16,int8"`` -> validated list (FP32 always included: it is the reference)."""
    names = [p.strip().lower() for p in precisions.split(",")] if isinstance(precisions, str) else [p.lower() for p in precisions]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"unknown precision(s) {', '.join(unknown)}; expected some of {', '.join(PRECISIONS)}")
    return ["fp32"] + [p for p in PRECISIONS[1:] if p in names]


def _rows(precision: str, calibrator: Optional[str], source: str, evaluation: Evaluation, fp32: Dict[str, float],
          noise: Optional[Dict[str, MetricNoise]] = None) -> List[ResultRow]:
    rows = []
    for metric, value in evaluation.metrics.items():
        reference = fp32.get(metric)
        delta = None if reference is None or math.isinf(reference) or math.isinf(value) else value - reference
        extra = (noise or {}).get(metric)
        rows.append(ResultRow(precision, calibrator, source, metric, float(value), delta, evaluation.seconds,
                              **(extra.to_dict() if extra is not None else {})))
    return rows


def noise_of(task: Task, evaluation: Evaluation, reference: Optional[Dict[str, SampleScores]]) -> Dict[str, MetricNoise]:
    """n, 95% interval and (with FP32's ``reference`` scores) the paired test of every metric of ``evaluation``."""
    scores = task.sample_scores(evaluation.state)
    return {m: metric_noise(s, None if reference is None else reference.get(m)) for m, s in scores.items()}


class _FidelityPass:
    """Keeps FP32's outputs (up to :data:`FIDELITY_MAX_ELEMENTS`) and compares each later pass with them."""

    def __init__(self, logits: bool) -> None:
        self.logits = logits
        self.reference: List[torch.Tensor] = []
        self.kept = 0

    def keep(self, index: int, outputs: torch.Tensor) -> None:
        if index == len(self.reference) and (not self.reference or self.kept + outputs.numel() <= FIDELITY_MAX_ELEMENTS):
            self.reference.append(outputs.detach().cpu())
            self.kept += outputs.numel()

    def accumulator(self) -> FidelityAccumulator:
        return FidelityAccumulator(logits=self.logits)

    def feed(self, accumulator: FidelityAccumulator) -> Callable[[int, torch.Tensor], None]:
        def on_outputs(index: int, outputs: torch.Tensor) -> None:
            if index < len(self.reference) and outputs.shape == self.reference[index].shape:
                accumulator.update(outputs, self.reference[index])
        return on_outputs


def compare(
    model: nn.Module,
    calib_data: Optional[Iterable[Any]],
    eval_data: Iterable[Any],
    *,
    metric: str = "top1",
    task: Optional[Task] = None,
    calibrators: Union[str, Sequence[str]] = "all",
    precisions: Union[str, Sequence[str]] = PRECISIONS,
    config: Optional[QuantConfig] = None,
    calib_batches: Optional[int] = None,
    eval_batches: Optional[int] = None,
    calibrator_params: Optional[Dict[str, Dict[str, Any]]] = None,
    layer_batches: int = 2,
    extra_candidates: Optional[Callable[[PTQResult], Iterable[Candidate]]] = None,
    progress: Optional[Progress] = None,
    on_reference: Optional[Callable[[Dict[str, Any]], None]] = None,
    on_rows: Optional[OnRows] = None,
    on_layers: Optional[Callable[[str, List[LayerError]], None]] = None,
    on_fidelity: Optional[Callable[[List[FidelityRow]], None]] = None,
) -> CompareResult:
    """Evaluates FP32, FP16 and INT8 (per calibrator) on the same eval batches.

    Args:
        model: The FP32 model (not modified: FP16 and INT8 run on copies).
        calib_data: Calibration batches (needed for INT8).
        eval_data: Eval batches (materialized once, up to ``eval_batches``).
        metric: Primary metric (built-in name or ``module:function``).
        task: A task object instead of choosing one by ``metric``.
        calibrators: Names or ``"all"``.
        precisions: Any of fp32, fp16, int8 (FP32 always runs: it is the reference).
        config: Quantization config (default :func:`quantlab.int8_config`).
        calib_batches: Use at most this many calibration batches.
        eval_batches: Use at most this many eval batches.
        calibrator_params: Per-calibrator parameters, e.g. ``{"percentile": {"percentile": 99.9}}``.
        layer_batches: Eval batches for the per-layer SQNR pass (0 = skip).
        extra_candidates: ``fn(ptq_result) -> [Candidate, ...]`` evaluated after
            the built-in precisions (e.g. ONNX Runtime INT8 sessions).
        progress: ``progress(stage, done, total)``.
        on_reference: ``on_reference(settings)`` once the FP32 pass validated the
            model, data and metric, before any other work (see :attr:`CompareResult.settings`).
        on_rows: ``on_rows(rows, fraction)`` after each evaluated configuration.
        on_layers: ``on_layers(calibrator, layer_errors)`` after each calibrator's per-layer pass.
        on_fidelity: ``on_fidelity(rows)`` with the output-fidelity row of each configuration
            after its rows (FP32 has none: it is the reference).

    Raises:
        EvaluationError / MetricError: the model, data or metric do not fit
            (raised from the FP32 pass, before ``on_reference``).
        CalibrationError: empty calibration data.
    """
    wanted = parse_precisions(precisions)
    names = parse_calibrators(calibrators) if "int8" in wanted else []
    if "int8" in wanted and calib_data is None:
        raise ConfigError("INT8 needs calibration data (calib_data)")
    if is_quantized(model):
        raise ConfigError(f"compare needs the FP32 model, but {type(model).__name__} already has quantizers")
    if task is None:
        task, metric = task_for_metric(metric)
    config = config or int8_config()
    # ptq, ptq+first, ptq+first+second, ...: each prefix of the pipeline is its own INT8 row.
    ordered = tuple(a.name for a in parse_algorithms(config.algorithms))
    check_params(ordered, {n: dict(p) for n, p in config.algorithm_params})  # before any work
    prefixes = [ordered[:i] for i in range(len(ordered) + 1)]

    def stage(name: str, total: int) -> Optional[Callable[[int], None]]:
        return (lambda done: progress(name, done, total)) if progress is not None else None

    batches = batches_of(eval_data, eval_batches)
    if not batches:
        raise EvaluationError("the eval data is empty: no batch to evaluate")
    outputs = _FidelityPass(task.outputs_are_logits)
    fp32 = evaluate_reference(model, task, batches, progress=stage("fp32", len(batches)), on_outputs=outputs.keep)
    if metric not in fp32.metrics:
        raise EvaluationError(f"metric {metric!r} is not produced by the {task.name} task on this data (it gives {', '.join(fp32.metrics) or 'nothing'})")

    settings = {
        "metric": metric,
        "task": {"name": task.name, "params": task.params()},
        "calibrators": names,
        "precisions": wanted,
        "eval_batches": len(batches),
        "calib_batches": calib_batches,
        "layer_batches": layer_batches,
        "calibrator_params": calibrator_params or {},
        "quant_config": config.to_dict(),
    }
    if ordered:
        settings["algorithms"] = list(ordered)
        settings["algorithm_params"] = {n: dict(p) for n, p in config.algorithm_params}
    if on_reference is not None:
        on_reference(dict(settings))
    rows: List[ResultRow] = []
    fidelity: List[FidelityRow] = []
    steps = 1 + ("fp16" in wanted) + len(names)
    completed = 0
    reference_scores = task.sample_scores(fp32.state)

    def record(new_rows: List[ResultRow]) -> None:
        nonlocal completed
        rows.extend(new_rows)
        completed += 1
        if on_rows is not None:
            on_rows(list(new_rows), min(1.0, completed / steps))

    def run(precision: str, calibrator: Optional[str], source: str, candidate: Any, **kwargs: Any) -> None:
        accumulator = outputs.accumulator()
        evaluation = evaluate(candidate, task, batches, on_outputs=outputs.feed(accumulator), **kwargs)
        record(_rows(precision, calibrator, source, evaluation, fp32.metrics, noise_of(task, evaluation, reference_scores)))
        measured = accumulator.result()
        if measured is not None:
            row = FidelityRow(precision, calibrator, source, **measured.to_dict())
            fidelity.append(row)
            if on_fidelity is not None:
                on_fidelity([row])

    record(_rows("fp32", None, "ptq", fp32, fp32.metrics, noise_of(task, fp32, None)))
    if "fp16" in wanted:
        # nn.Module.half, not model.half(): some libraries override half() and refuse (e.g. a
        # transformers model loaded from GGUF, whose weights are already de-quantized to FP32).
        half = nn.Module.half(copy.deepcopy(model))
        run("fp16", None, "ptq", half, input_dtype=torch.float16, progress=stage("fp16", len(batches)))
        del half
    ptq: Optional[PTQResult] = None
    errors: Dict[str, List[LayerError]] = {}
    variants: Dict[str, Variant] = {}
    if "int8" in wanted:
        steps += len(names) * (len(prefixes) - 1)
        for index, algorithms in enumerate(prefixes):
            last = index == len(prefixes) - 1
            source = variant_source(algorithms)
            quant = copy.deepcopy(model)
            variant_config = config.replace(algorithms=algorithms, algorithm_params=tuple(
                (n, p) for n, p in config.algorithm_params if n in algorithms))
            ptq = run_ptq(quant, calib_data, names, config=variant_config, max_batches=calib_batches,
                          calibrator_params=calibrator_params, progress=stage(f"statistics {source}" if prefixes[1:] else "statistics",
                                                                              calib_batches or 0))
            for name in names:
                if ptq.refined_weights:
                    restore_refinable_state(quant, ptq.refined_weights[name])  # this calibrator's refined weights
                load_scales(quant, ptq.scales[name])
                label = name if not prefixes[1:] else f"{name} {source}"
                run("int8", name, source, quant, progress=stage(f"int8 {label}", len(batches)))
                if layer_batches > 0 and last:
                    errors[name] = layer_errors(model, quant, batches[:layer_batches], inputs_of=task.inputs)
                    if on_layers is not None:
                        on_layers(name, errors[name])
            variants[source] = Variant(source, tuple(algorithms), ptq, quant if (ptq.transforms or any(ptq.refinements.values())) else None)
            if last and extra_candidates is not None:
                for candidate in extra_candidates(ptq):
                    run(candidate.precision, candidate.calibrator, candidate.source, candidate.model,
                        input_dtype=candidate.input_dtype, device=candidate.device)
            del quant
    outputs.reference.clear()
    return CompareResult(
        rows=rows, metric=metric, higher_is_better=task.higher_is_better(metric), task=task, ptq=ptq,
        layer_errors=errors, run_id=None, run_dir=None, eval_batches=len(batches), settings=settings, variants=variants,
        fidelity=fidelity, example_inputs=task.inputs(batches[0]),
    )
