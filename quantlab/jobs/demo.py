"""The demo job: what ``quantlab demo`` and the dashboard's New run page run, as plain quantlab calls.

    compare (one statistics pass, every calibrator; FP32/FP16/INT8)  -> the run
    sensitivity ranking of the best calibrator                         -> child run "sensitivity"
    Q/DQ ONNX export + ``check`` report + calibration cache            -> child run "export"

Every number comes from :func:`quantlab.evaluation.compare.compare`,
:func:`quantlab.evaluation.sensitivity.rank_layers`, :mod:`quantlab.export`
and :mod:`quantlab.runtimes.tensorrt`; this module only orders the calls, records them
(through the :class:`~quantlab.jobs.recorder.Recorder`) and reports progress (to
the store, so the dashboard's progress bar survives a browser refresh, to
``job.json`` for the stage line, and to an optional callback for the CLI).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from quantlab._io import write_text_atomic
from quantlab.errors import QuantlabError
from quantlab.jobs.demo_spec import JobSpec
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.recorder import RecordedRun, Recorder, outcome

JOB_FILE = "job.json"
# Seconds between progress writes to the store (a batch can take milliseconds).
PROGRESS_INTERVAL = 0.4

ProgressFn = Callable[[str, float], None]


def job_file(run_dir: "str | Path") -> Path:
    """``<run folder>/job.json``: the worker's pid, current stage and log file."""
    return Path(run_dir) / JOB_FILE


def read_job_file(run_dir: Optional[str]) -> Dict[str, Any]:
    """The job file of a run folder ({} if there is none or it is being replaced)."""
    if not run_dir:
        return {}
    try:
        info = json.loads(job_file(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


class Reporter:
    """Maps stage progress to one 0..1 number in the store and a stage line in job.json."""

    def __init__(self, run: RecordedRun, run_dir: Path, callback: Optional[ProgressFn] = None) -> None:
        self.run, self.run_dir, self.callback = run, run_dir, callback
        self.span: Tuple[float, float] = (0.0, 1.0)
        self.stage = ""
        self.last_write = 0.0
        self.info: Dict[str, Any] = {"pid": os.getpid(), "stage": "", "progress": 0.0, "skipped": [], "outputs": {}}
        self._written_stage = None

    def enter(self, stage: str, start: float, end: float) -> None:
        self.span, self.stage = (start, end), stage
        self.update(0.0, force=True)

    def update(self, fraction: float, *, force: bool = False, detail: str = "") -> None:
        start, end = self.span
        overall = min(1.0, max(0.0, start + (end - start) * min(1.0, max(0.0, fraction))))
        label = f"{self.stage} {detail}".strip()
        now = time.monotonic()
        if self.callback is not None:
            self.callback(label, overall)
        if force or now - self.last_write >= PROGRESS_INTERVAL:
            self.last_write = now
            self.run.progress(overall, label)
            if force or label != self._written_stage:
                self._written_stage = label
                self.info.update(stage=label, progress=overall)
                self.write_info()

    def write_info(self) -> None:
        try:
            write_text_atomic(job_file(self.run_dir), json.dumps(self.info, indent=1))
        except OSError:  # the job file is a convenience; never fail a job over it
            pass


class _CompareProgress:
    """compare's ``progress(stage, done, total)`` -> a fraction of the compare share."""

    def __init__(self, reporter: Reporter, spec: JobSpec) -> None:
        int8 = "int8" in spec.precisions
        # + 1: the deployment cost (the exported files timed in ONNX Runtime) comes last
        self.slots = 1 + ("fp16" in spec.precisions) + ((1 + len(spec.calibrators)) if int8 else 0) + 1
        self.reporter, self.seen, self.current = reporter, [], None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.current:
            self.current = stage
            self.seen.append(stage)
        index = len(self.seen) - 1
        within = (done / total) if total else 0.5
        self.reporter.update((index + within) / self.slots, detail=f"· {stage}")


def _shares(spec: JobSpec) -> Dict[str, Tuple[float, float]]:
    """Progress spans of the stages (compare dominates; export is quick)."""
    stages = [("load", 0.04), ("compare", 0.7)]
    if spec.sensitivity:
        stages.append(("sensitivity", 0.18))
    if spec.export:
        stages.append(("export", 0.08))
    stages.append(("report", 0.02))
    total = sum(w for _, w in stages)
    spans, start = {}, 0.0
    for name, weight in stages:
        spans[name] = (start, start + weight / total)
        start += weight / total
    return spans


def description(spec: JobSpec) -> RunDescription:
    """The demo run's :class:`RunDescription` (the spec is its config, under ``"job"``)."""
    return RunDescription(
        kind=RunKind.DEMO,
        model=spec.model,
        data=spec.calib_data if "int8" in spec.precisions else None,
        eval_data=spec.eval_data,
        config={"job": spec.to_dict(), "metric": spec.metric, "calibrators": spec.calibrators, "precisions": spec.precisions},
        run_dir=spec.out_dir,
        name=spec.name or None,
    )


def run_demo(store: Any, spec: JobSpec, *, run_id: Optional[str] = None, progress: Optional[ProgressFn] = None) -> Dict[str, Any]:
    """Runs ``spec`` as one recorded run (with its child runs); marks it done or failed.

    Args:
        store: The :class:`quantlab.store.RunStore` (or a :class:`Recorder`).
        spec: A validated job spec (:func:`quantlab.jobs.demo_spec.validate`).
        run_id: Adopt this already created run (the dashboard's worker, see
            :mod:`quantlab.jobs.worker`) instead of creating one.
        progress: ``progress(stage_text, overall_fraction)`` (the CLI draws a bar).

    Returns:
        ``{"run_id", "run_dir", "outputs": {what: path}, "skipped": [why], "children": [run ids],
        "best_calibrator", "metric", "rows": [result rows]}``.

    Raises:
        Whatever failed, after recording it as the run's error.
    """
    from quantlab.data import load_data
    from quantlab.jobs.compare import compare_into
    from quantlab.jobs.export import first_inputs
    from quantlab.jobs.folders import JOB_FILES, open_run_folder
    from quantlab.model_source import load_model

    recorder = store if isinstance(store, Recorder) else Recorder(store)
    run_dir = Path(spec.out_dir)
    children: List[str] = []
    # The run folder's lock is held for the whole job (compare commits its files as a whole,
    # keeping the worker's job.json/job.log; sensitivity and export then add theirs).
    # Refused before anything is recorded; an adopted run (the dashboard's worker) records the refusal.
    folder = open_run_folder(run_dir, kind="demo", keep=JOB_FILES) if run_id is None else None
    with contextlib.ExitStack() as stack:
        if folder is not None:
            stack.callback(folder.close)
        run = stack.enter_context(recorder.run(description(spec), run_id=run_id))
        if folder is None:
            folder = open_run_folder(run_dir, kind="demo", keep=JOB_FILES)
            stack.callback(folder.close)
        run_dir.mkdir(parents=True, exist_ok=True)
        reporter = Reporter(run, run_dir, progress)
        spans = _shares(spec)
        try:
            reporter.enter("loading model and data", *spans["load"])
            # The model first: a factory module may register the datasets it needs.
            model = load_model(spec.model, weights=spec.weights)
            calib = load_data(spec.calib_data, batch_size=spec.batch_size) if "int8" in spec.precisions else None
            eval_data = load_data(spec.eval_data, batch_size=spec.batch_size)
            describe = {
                "model": spec.model, "data": spec.calib_data if calib is not None else None, "eval_data": spec.eval_data,
                "weights": spec.weights, "device": None, "batch_size": spec.batch_size, "name": spec.name,
            }
            reporter.enter("compare", *spans["compare"])
            # Recorded into this run (its config is the job); the Reporter tracks finer progress than compare's.
            result = compare_into(
                lambda settings: run, model, calib, eval_data, run_dir=run_dir, describe=describe, folder=folder,
                record_progress=False,
                metric=spec.metric, calibrators=spec.calibrators or "all", precisions=spec.precisions,
                calib_batches=spec.calib_batches, eval_batches=spec.eval_batches,
                progress=_CompareProgress(reporter, spec),
            )
            best = result.best_calibrator
            reporter.info["outputs"]["results"] = str(run_dir / "results.json")
            if result.ptq is not None:
                for name in result.ptq.scales:
                    reporter.info["outputs"][f"scales ({name})"] = str(run_dir / f"scales.{name}.json")
            if spec.sensitivity and best and result.ptq is not None:
                reporter.enter(f"sensitivity ({best})", *spans["sensitivity"])
                children.append(_sensitivity(recorder, run, spec, model, result, eval_data, reporter))
            if spec.export and best and result.ptq is not None:
                reporter.enter(f"export ({best})", *spans["export"])
                children.append(_export(recorder, run, spec, model, result, first_inputs(eval_data), reporter))
            reporter.enter("report", *spans["report"])
            try:
                from quantlab.jobs.report import write_report

                report = write_report(run_dir)
                run.artifact("report", report)
                reporter.info["outputs"]["report"] = str(report)
            except (QuantlabError, ValueError) as exc:  # the numbers are in the store; the report is a convenience
                reporter.info["skipped"].append(f"report: {exc}")
            reporter.info.update(stage="done", progress=1.0, children=children)
            reporter.write_info()
        except BaseException as exc:
            status, message = outcome(exc)
            reporter.info.update(stage=status, error=message, traceback=traceback.format_exc())
            reporter.write_info()
            raise
    return {"run_id": run.run_id, "run_dir": str(run_dir), "outputs": dict(reporter.info["outputs"]),
            "skipped": list(reporter.info["skipped"]), "children": children, "best_calibrator": best,
            "metric": result.metric, "rows": [r.to_dict() for r in result.rows],
            "fidelity": [r.to_dict() for r in result.fidelity], "deployment": [r.to_dict() for r in result.deployment]}


def _quantized_copy(model: Any, scales: Any) -> Any:
    from quantlab.api import load_scales

    quant = copy.deepcopy(model)
    load_scales(quant, scales)  # attaches quantizers with the scales' config, then loads every range
    return quant


def _sensitivity(recorder: Recorder, run: RecordedRun, spec: JobSpec, model: Any, result: Any, eval_data: Any,
                 reporter: Reporter) -> Optional[str]:
    """Ranks layers for the best calibrator; records a child ``sensitivity`` run."""
    from quantlab.evaluation.sensitivity import rank_layers
    from quantlab.evaluation.tasks import batches_of
    from quantlab.jobs.sensitivity import summary, write_summary

    best = result.best_calibrator
    quant = _quantized_copy(model, result.ptq.scales[best])
    batches = batches_of(eval_data, spec.eval_batches)
    stages: List[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            stages.append(stage)
        reporter.update(min(1.0, (len(stages) - 1 + (done / total if total else 0.5)) / 2), detail=f"· {stage}")

    ranking = rank_layers(model, quant, result.task, batches, metric=result.metric,
                          errors=result.layer_errors.get(best), progress=progress)
    child_description = RunDescription(
        kind=RunKind.SENSITIVITY, model=spec.model, data=spec.calib_data, eval_data=spec.eval_data, run_dir=spec.out_dir,
        parent_id=run.run_id, name=f"sensitivity · {best}",
        config={"calibrator": best, "metric": ranking.metric, "method": ranking.method, "fp32": ranking.fp32,
                "baseline": ranking.baseline, "subset_batches": ranking.subset_batches,
                "total_batches": ranking.total_batches, "cost_passes": ranking.cost_passes},
    )
    with recorder.run(child_description) as child:
        child.layer_stats(ranking.to_rows(best))
        # The same file `quantlab sensitivity` writes.
        path = write_summary(Path(spec.out_dir) / f"sensitivity.{best}.json", summary(child.run_id, run.run_id, best, ranking))
        child.artifact("sensitivity", path)
    return child.run_id


def _export(recorder: Recorder, run: RecordedRun, spec: JobSpec, model: Any, result: Any, example: Any,
            reporter: Reporter) -> Optional[str]:
    """The job's export stage: the best calibrator's artifacts (see :func:`quantlab.jobs.export.export_artifacts`)."""
    from quantlab.jobs.export import export_artifacts

    best = result.best_calibrator
    exported = export_artifacts(
        recorder, run.run_id, model=model, scales=result.ptq.scales[best], calibrator=best,
        example=example, out_dir=Path(spec.out_dir),
        describe={"model": spec.model, "data": spec.calib_data, "eval_data": spec.eval_data},
        progress=lambda fraction, what: reporter.update(fraction, detail=f"· {what}"),
    )
    reporter.info["outputs"].update(exported["outputs"])
    reporter.info["skipped"].extend(exported["skipped"])
    return exported["run_id"]


__all__ = ["JOB_FILE", "Reporter", "description", "job_file", "read_job_file", "run_demo"]
