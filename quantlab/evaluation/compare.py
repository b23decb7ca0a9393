"""Compare FP32, FP16 and INT8 (every calibrator) on the same eval data, in one call.

* One statistics pass (:func:`quantlab.ptq.run_ptq`) is shared by all calibrators.
* FP32 runs first and becomes the reference (embedding cosine, token agreement,
  linear probe); it also validates the task, metric and data BEFORE anything is
  written, so bad input leaves the run store untouched.
* FP16 runs a ``model.half()`` copy with floating-point inputs cast to half
  (integer token ids stay integers); on a CPU this is slow but correct.
* INT8 runs a fake-quantized copy in PyTorch, once per calibrator. ONNX Runtime
  INT8 execution lives in :mod:`quantlab.runtimes`; it plugs in through
  ``extra_candidates`` (any callable taking the model's inputs), evaluated on the
  same batches and recorded the same way.
* Per-layer SQNR / cosine per calibrator on a few batches (:mod:`.layers`).

Results go to the run store (kind ``compare``) and a run folder holding
``run.json`` (how to redo it), ``scales.<calibrator>.json`` and ``results.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from quantlab._io import write_text_atomic
from quantlab.api import load_scales
from quantlab.attach import is_quantized
from quantlab.config import QuantConfig, int8_config
from quantlab.errors import ConfigError, QuantlabError
from quantlab.interrupts import outcome_message, outcome_status
from quantlab.evaluation.errors import EvaluationError
from quantlab.evaluation.evaluate import Evaluation, evaluate, evaluate_reference
from quantlab.evaluation.layers import LayerError, layer_errors
from quantlab.evaluation.tasks import Task, batches_of, task_for_metric
from quantlab.ptq import PTQResult, parse_calibrators, run_ptq

PRECISIONS = ("fp32", "fp16", "int8")
Progress = Callable[[str, int, int], None]


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
class ResultRow:
    """One metric of one precision/calibrator (the run store's ``results`` row)."""

    precision: str
    calibrator: Optional[str]
    source: str
    metric: str
    value: float
    delta: Optional[float]
    seconds: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


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
        run_id: Run store id (None when not recorded).
        run_dir: The run folder (None when not written).
        eval_batches: Number of eval batches used.
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
        int8 = [r for r in self.primary_rows() if r.precision == "int8" and r.source == "ptq" and r.calibrator]
        if not int8:
            return None
        sign = 1.0 if self.higher_is_better else -1.0
        return max(int8, key=lambda r: sign * r.value).calibrator


def parse_precisions(precisions: Union[str, Sequence[str]]) -> List[str]:
    """``"fp32,fp16,int8"`` -> validated list (FP32 always included: it is the reference)."""
    names = [p.strip().lower() for p in precisions.split(",")] if isinstance(precisions, str) else [p.lower() for p in precisions]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown:
        raise ConfigError(f"unknown precision(s) {', '.join(unknown)}; expected some of {', '.join(PRECISIONS)}")
    return ["fp32"] + [p for p in PRECISIONS[1:] if p in names]


def _rows(precision: str, calibrator: Optional[str], source: str, evaluation: Evaluation, fp32: Dict[str, float]) -> List[ResultRow]:
    rows = []
    for metric, value in evaluation.metrics.items():
        reference = fp32.get(metric)
        delta = None if reference is None or math.isinf(reference) or math.isinf(value) else value - reference
        rows.append(ResultRow(precision, calibrator, source, metric, float(value), delta, evaluation.seconds))
    return rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
    store: Any = None,
    run_dir: Optional[Union[str, Path]] = None,
    describe: Optional[Dict[str, Any]] = None,
    extra_candidates: Optional[Callable[[PTQResult], Iterable[Candidate]]] = None,
    progress: Optional[Progress] = None,
    folder: Any = None,
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
        store: A :class:`quantlab.store.RunStore`, None for the default store, or
            False to record nothing.
        run_dir: Run folder for run.json, scales and results.json (None: not written).
        describe: Strings recorded with the run: ``model``, ``data``, ``eval_data``
            and anything else for ``run.json`` (the CLI passes its specs).
        extra_candidates: ``fn(ptq_result) -> [Candidate, ...]`` evaluated after
            the built-in precisions (e.g. ONNX Runtime INT8 sessions).
        progress: ``progress(stage, done, total)``.
        folder: A :class:`quantlab.store.RunFolder` on ``run_dir`` the caller holds
            (a job that writes more into the folder after compare); by default
            compare opens one itself (lock + output check before any work) and
            closes it. Either way the folder is committed as a whole.

    Raises:
        EvaluationError / MetricError: the model, data or metric do not fit
            (raised from the FP32 pass, before the store or run folder is touched).
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
    describe = dict(describe or {})
    own_folder = folder is None and run_dir is not None
    if own_folder:
        from quantlab.store.runfolder import RunFolder

        # Before any work: a second writer of the same folder, or a folder that is not a run, is refused now.
        folder = RunFolder(run_dir, kind="compare", keep=("job.json", "job.log"), purpose="quantlab compare")
    try:
        return _compare(
            model=model, calib_data=calib_data, eval_data=eval_data, metric=metric, task=task, names=names,
            wanted=wanted, config=config, calib_batches=calib_batches, eval_batches=eval_batches,
            calibrator_params=calibrator_params, layer_batches=layer_batches, store=store, run_dir=run_dir,
            describe=describe, extra_candidates=extra_candidates, progress=progress, folder=folder,
        )
    finally:
        if own_folder:
            folder.close()


def _compare(*, model, calib_data, eval_data, metric, task, names, wanted, config, calib_batches, eval_batches,
             calibrator_params, layer_batches, store, run_dir, describe, extra_candidates, progress, folder) -> CompareResult:
    """compare's body, inside the run folder's lock (arguments as :func:`compare` resolved them)."""
    def stage(name: str, total: int) -> Optional[Callable[[int], None]]:
        return (lambda done: progress(name, done, total)) if progress is not None else None

    batches = batches_of(eval_data, eval_batches)
    if not batches:
        raise EvaluationError("the eval data is empty: no batch to evaluate")
    fp32 = evaluate_reference(model, task, batches, progress=stage("fp32", len(batches)))
    if metric not in fp32.metrics:
        raise EvaluationError(f"metric {metric!r} is not produced by the {task.name} task on this data (it gives {', '.join(fp32.metrics) or 'nothing'})")

    run_config = {
        "metric": metric,
        "task": {"name": task.name, "params": task.params()},
        "calibrators": names,
        "precisions": wanted,
        "eval_batches": len(batches),
        "calib_batches": calib_batches,
        "layer_batches": layer_batches,
        "calibrator_params": calibrator_params or {},
        "quant_config": config.to_dict(),
        **{k: v for k, v in describe.items() if k not in ("model", "data", "eval_data")},
    }
    if store is None:
        from quantlab.store import RunStore

        store = RunStore()
    run_id = None
    if store is not False:
        run_id = store.create_run(
            "compare",
            model=str(describe.get("model") or type(model).__name__),
            data=describe.get("data"),
            eval_data=describe.get("eval_data"),
            config=run_config,
            run_dir=run_dir,
            name=describe.get("name"),
        )
    out_dir = Path(run_dir) if run_dir is not None else None
    try:
        rows: List[ResultRow] = []
        steps = 1 + ("fp16" in wanted) + len(names)
        completed = 0

        def record(new_rows: List[ResultRow]) -> None:
            nonlocal completed
            rows.extend(new_rows)
            completed += 1
            if run_id is not None:
                store.add_results(run_id, [r.to_dict() for r in new_rows])
                store.set_status(run_id, "running", progress=min(1.0, completed / steps))

        record(_rows("fp32", None, "ptq", fp32, fp32.metrics))
        if "fp16" in wanted:
            # nn.Module.half, not model.half(): some libraries override half() and refuse (e.g. a
            # transformers model loaded from GGUF, whose weights are already de-quantized to FP32).
            half = nn.Module.half(copy.deepcopy(model))
            record(_rows("fp16", None, "ptq", evaluate(half, task, batches, input_dtype=torch.float16, progress=stage("fp16", len(batches))), fp32.metrics))
            del half
        ptq: Optional[PTQResult] = None
        errors: Dict[str, List[LayerError]] = {}
        if "int8" in wanted:
            quant = copy.deepcopy(model)
            ptq = run_ptq(quant, calib_data, names, config=config, max_batches=calib_batches,
                          calibrator_params=calibrator_params, progress=stage("statistics", calib_batches or 0))
            for name in names:
                load_scales(quant, ptq.scales[name])
                evaluation = evaluate(quant, task, batches, progress=stage(f"int8 {name}", len(batches)))
                record(_rows("int8", name, "ptq", evaluation, fp32.metrics))
                if layer_batches > 0:
                    errors[name] = layer_errors(model, quant, batches[:layer_batches], inputs_of=task.inputs)
                    if run_id is not None:
                        store.add_layer_stats(run_id, [e.to_row(name) for e in errors[name]])
            if extra_candidates is not None:
                for candidate in extra_candidates(ptq):
                    evaluation = evaluate(candidate.model, task, batches, input_dtype=candidate.input_dtype, device=candidate.device)
                    record(_rows(candidate.precision, candidate.calibrator, candidate.source, evaluation, fp32.metrics))
            del quant
        result = CompareResult(
            rows=rows, metric=metric, higher_is_better=task.higher_is_better(metric), task=task, ptq=ptq,
            layer_errors=errors, run_id=run_id, run_dir=out_dir, eval_batches=len(batches),
        )
        if out_dir is not None:
            _write_run_folder(result, folder, run_config, describe, store if store is not False else None)
        if run_id is not None:
            store.set_status(run_id, "done")
        return result
    except BaseException as exc:
        if run_id is not None:
            try:
                store.set_status(run_id, outcome_status(exc), error=outcome_message(exc))
            except QuantlabError:
                pass  # keep the original error: it is the one the user needs to see
        raise


def _write_run_folder(result: CompareResult, folder: Any, run_config: Dict[str, Any], describe: Dict[str, Any], store: Any) -> None:
    """Stages run.json, results.json and every scales file, then commits the folder as a whole
    (a kill leaves the previous folder or this one); artifacts are recorded once the files are there."""
    folder.run_id = result.run_id
    folder.store = str(store.path) if store is not None else None
    out_dir = folder.stage()
    scales_paths: Dict[str, str] = {}
    if result.ptq is not None:
        for name, path in result.ptq.save(out_dir).items():
            scales_paths[name] = str(folder.final(path))
    run_info = {
        "run_id": result.run_id,
        "store": str(store.path) if store is not None else None,
        "kind": "compare",
        "model": describe.get("model"),
        "data": describe.get("data"),
        "eval_data": describe.get("eval_data"),
        **run_config,
    }
    write_text_atomic(out_dir / "run.json", json.dumps(_json_safe(run_info), indent=1))
    results = {
        "run_id": result.run_id,
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "best_calibrator": result.best_calibrator,
        "rows": [r.to_dict() for r in result.rows],
        "statistics": None if result.ptq is None else {
            "num_batches": result.ptq.num_batches,
            "statistics_seconds": result.ptq.statistics_seconds,
            "calibrate_seconds": result.ptq.calibrate_seconds,
        },
        "scales": scales_paths,
        "layers": {name: [dataclasses.asdict(e) for e in errs] for name, errs in result.layer_errors.items()},
    }
    path = folder.final(write_text_atomic(out_dir / "results.json", json.dumps(_json_safe(results), indent=1)))
    folder.commit()
    if store is not None:
        for scales in scales_paths.values():
            store.add_artifact(result.run_id, "scales", scales)
        store.add_artifact(result.run_id, "results", path)
