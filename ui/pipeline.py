"""The job behind ``quantlab demo`` and the New run page, as plain quantlab calls.

    compare (one statistics pass, every calibrator; FP32/FP16/INT8)  -> the run
    sensitivity ranking of the best calibrator                         -> child run "sensitivity"
    Q/DQ ONNX export + ``check`` report + calibration cache            -> child run "export"

Every number comes from :func:`quantlab.evaluation.compare.compare`,
:func:`quantlab.evaluation.sensitivity.rank_layers`, :mod:`quantlab.export`
and :mod:`quantlab.runtimes.tensorrt`; this module only orders the calls, records them in
the run store and reports progress (to the store, so the dashboard's progress
bar survives a browser refresh, and to an optional callback for the CLI).
"""
from __future__ import annotations

import copy
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from quantlab._io import write_text_atomic
from quantlab.errors import QuantlabError
from quantlab.ui import backend
from quantlab.ui.spec import JobSpec

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

    def __init__(self, store: Any, run_id: str, run_dir: Path, callback: Optional[ProgressFn] = None) -> None:
        self.store, self.run_id, self.run_dir, self.callback = store, run_id, run_dir, callback
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
            self.store.set_status(self.run_id, "running", progress=overall)
            if force or label != self._written_stage:
                self._written_stage = label
                self.info.update(stage=label, progress=overall)
                self.write_info()

    def write_info(self) -> None:
        try:
            write_text_atomic(job_file(self.run_dir), json.dumps(self.info, indent=1))
        except OSError:  # the job file is a convenience; never fail a job over it
            pass


class _BoundStore:
    """The run store as ``compare`` sees it: its run is the one the dashboard created.

    ``create_run`` returns the existing run id (the dashboard validated the input
    and created the run before starting the worker, so the page can follow it
    from the first second); status updates are rescaled into the compare share
    of the job's progress, and "done" waits for the rest of the job.
    """

    def __init__(self, store: Any, run_id: str, reporter: Reporter) -> None:
        self._store, self._run_id, self._reporter = store, run_id, reporter

    def create_run(self, kind: str, **_: Any) -> str:
        return self._run_id

    def set_status(self, run_id: str, status: str, *, error: Optional[str] = None, progress: Optional[float] = None) -> None:
        if status in ("failed", "interrupted"):
            self._store.set_status(run_id, status, error=error)
        # "running"/"done" from compare: the Reporter already tracks finer progress.

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _CompareProgress:
    """compare's ``progress(stage, done, total)`` -> a fraction of the compare share."""

    def __init__(self, reporter: Reporter, spec: JobSpec) -> None:
        int8 = "int8" in spec.precisions
        self.slots = 1 + ("fp16" in spec.precisions) + ((1 + len(spec.calibrators)) if int8 else 0)
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


def run_job(store: Any, run_id: str, spec: JobSpec, *, progress: Optional[ProgressFn] = None) -> Dict[str, Any]:
    """Runs ``spec`` into the already created run ``run_id``; marks it done or failed.

    Args:
        store: The :class:`quantlab.store.RunStore`.
        run_id: The run (status ``running``) that :func:`quantlab.ui.jobs.create_job_run` recorded.
        spec: A validated job spec.
        progress: ``progress(stage_text, overall_fraction)`` (the CLI draws a bar).

    Returns:
        ``{"run_id", "run_dir", "outputs": {what: path}, "skipped": [why], "children": [run ids]}``.

    Raises:
        Whatever failed, after recording it as the run's error.
    """
    from quantlab.data import load_data
    from quantlab.evaluation.compare import compare
    from quantlab.model_source import load_model

    run_dir = Path(spec.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(store, run_id, run_dir, progress)
    spans = _shares(spec)
    children: List[str] = []
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
        result = compare(
            model, calib, eval_data,
            metric=spec.metric, calibrators=spec.calibrators or "all", precisions=spec.precisions,
            calib_batches=spec.calib_batches, eval_batches=spec.eval_batches,
            store=_BoundStore(store, run_id, reporter), run_dir=run_dir, describe=describe,
            progress=_CompareProgress(reporter, spec),
        )
        best = result.best_calibrator
        reporter.info["outputs"]["results"] = str(run_dir / "results.json")
        if result.ptq is not None:
            for name in result.ptq.scales:
                reporter.info["outputs"][f"scales ({name})"] = str(run_dir / f"scales.{name}.json")
        if spec.sensitivity and best and result.ptq is not None:
            reporter.enter(f"sensitivity ({best})", *spans["sensitivity"])
            children.append(_sensitivity(store, run_id, spec, model, result, eval_data, reporter))
        if spec.export and best and result.ptq is not None:
            reporter.enter(f"export ({best})", *spans["export"])
            children.append(_export(store, run_id, spec, model, result, eval_data, reporter))
        reporter.enter("report", *spans["report"])
        try:
            report = backend.write_report(run_dir)
            store.add_artifact(run_id, "report", report)
            reporter.info["outputs"]["report"] = str(report)
        except (QuantlabError, ValueError) as exc:  # the numbers are in the store; the report is a convenience
            reporter.info["skipped"].append(f"report: {exc}")
        reporter.info.update(stage="done", progress=1.0, children=children)
        reporter.write_info()
        store.set_status(run_id, "done")
        return {"run_id": run_id, "run_dir": str(run_dir), "outputs": dict(reporter.info["outputs"]),
                "skipped": list(reporter.info["skipped"]), "children": children, "best_calibrator": best}
    except BaseException as exc:
        from quantlab.interrupts import outcome_message, outcome_status

        message = outcome_message(exc)
        reporter.info.update(stage=outcome_status(exc), error=message, traceback=traceback.format_exc())
        reporter.write_info()
        try:
            store.set_status(run_id, outcome_status(exc), error=message)
        except Exception:  # noqa: BLE001 - the original error matters more than a failed status write
            pass
        raise


def _quantized_copy(model: Any, scales: Any) -> Any:
    from quantlab.api import load_scales

    quant = copy.deepcopy(model)
    load_scales(quant, scales)  # attaches quantizers with the scales' config, then loads every range
    return quant


def _sensitivity(store: Any, run_id: str, spec: JobSpec, model: Any, result: Any, eval_data: Any, reporter: Reporter) -> str:
    """Ranks layers for the best calibrator; records a child ``sensitivity`` run."""
    from quantlab.evaluation.sensitivity import rank_layers
    from quantlab.evaluation.tasks import batches_of

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
    child = store.create_run(
        "sensitivity", model=spec.model, data=spec.calib_data, eval_data=spec.eval_data, run_dir=spec.out_dir,
        parent_id=run_id, name=f"sensitivity · {best}",
        config={"calibrator": best, "metric": ranking.metric, "method": ranking.method, "fp32": ranking.fp32,
                "baseline": ranking.baseline, "subset_batches": ranking.subset_batches,
                "total_batches": ranking.total_batches, "cost_passes": ranking.cost_passes},
    )
    try:
        store.add_layer_stats(child, ranking.to_rows(best))
        summary = {  # the same file `quantlab sensitivity` writes
            "run_id": child, "parent_id": run_id, "calibrator": best, "metric": ranking.metric,
            "method": ranking.method, "fp32": ranking.fp32, "int8": ranking.baseline,
            "subset_batches": ranking.subset_batches, "total_batches": ranking.total_batches,
            "cost_passes": ranking.cost_passes, "seconds": ranking.seconds,
            "layers": [vars(entry) for entry in ranking.layers], "agreement": None, "full_ranking": None,
        }
        path = write_text_atomic(Path(spec.out_dir) / f"sensitivity.{best}.json", json.dumps(summary, indent=1, default=str))
        store.add_artifact(child, "sensitivity", path)
        store.set_status(child, "done")
    except BaseException as exc:
        store.set_status(child, "failed", error=str(exc))
        raise
    return child


def _export(store: Any, run_id: str, spec: JobSpec, model: Any, result: Any, eval_data: Any, reporter: Reporter) -> str:
    """The job's export stage: the best calibrator's artifacts (see :func:`export_artifacts`)."""
    best = result.best_calibrator
    outcome = export_artifacts(
        store, run_id, model=model, scales=result.ptq.scales[best], calibrator=best,
        example=backend.example_inputs(eval_data), out_dir=Path(spec.out_dir),
        describe={"model": spec.model, "data": spec.calib_data, "eval_data": spec.eval_data},
        progress=lambda fraction, what: reporter.update(fraction, detail=f"· {what}"),
    )
    reporter.info["outputs"].update(outcome["outputs"])
    reporter.info["skipped"].extend(outcome["skipped"])
    return outcome["run_id"]


def export_artifacts(
    store: Any,
    parent_id: str,
    *,
    model: Any,
    scales: Any,
    calibrator: str,
    example: Any,
    out_dir: Path,
    describe: Dict[str, Any],
    progress: Optional[Callable[[float, str], None]] = None,
) -> Dict[str, Any]:
    """Q/DQ ONNX of ``model`` with ``scales``, its check report and a calibration cache: a child ``export`` run.

    Args:
        store: The run store.
        parent_id: The compare run the scales come from.
        model: The FP32 model (not modified).
        scales: The calibrator's :class:`quantlab.Scales`.
        calibrator: Its name (for names and the record).
        example: A batch of model inputs to trace the export with.
        out_dir: Where the files go (``model.int8.onnx``, ``check.json``/``.md``,
            ``model.fp32.onnx``, ``calibration.cache``).
        describe: ``model``, ``data``, ``eval_data`` specs for the record.
        progress: ``progress(fraction, what)``.

    Returns:
        ``{"run_id", "outputs": {what: path}, "skipped": [why]}``; the calibration
        cache is a legacy artifact, so its failure is noted rather than raised.
    """
    step = progress or (lambda fraction, what: None)
    out = Path(out_dir)
    child = store.create_run("export", model=describe.get("model") or "model", data=describe.get("data"),
                             eval_data=describe.get("eval_data"), run_dir=out, parent_id=parent_id,
                             name=f"export · {calibrator}",
                             config={"calibrator": calibrator, "precision": "int8", "target": "tensorrt"})
    outputs: Dict[str, str] = {}
    skipped: List[str] = []
    try:
        quant = _quantized_copy(model, scales)
        step(0.1, "Q/DQ ONNX")
        onnx_path = backend.export_qdq(quant, out / "model.int8.onnx", example)
        store.add_artifact(child, "onnx", onnx_path)
        outputs["onnx"] = str(onnx_path)
        step(0.5, "check")
        report = backend.check_onnx(str(onnx_path))
        check_json = write_text_atomic(out / "check.json", json.dumps(report, indent=1))
        check_md = write_text_atomic(out / "check.md", backend.check_markdown(report))
        store.add_artifact(child, "check", check_json)
        store.add_artifact(child, "check_report", check_md)
        outputs["check"] = str(check_md)
        step(0.7, "calibration cache")
        try:
            cache = backend.write_calibration_cache(model, scales, example, out)
            store.add_artifact(child, "onnx_fp32", out / "model.fp32.onnx")
            store.add_artifact(child, "calibration_cache", cache)
            outputs["calibration_cache"] = str(cache)
        except (QuantlabError, ValueError) as exc:  # a legacy artifact: note why, keep the main results
            skipped.append(f"calibration cache: {exc}")
        store.set_status(child, "done")
    except BaseException as exc:
        store.set_status(child, "failed", error=str(exc))
        raise
    return {"run_id": child, "outputs": outputs, "skipped": skipped}


def export_recorded_run(store: Any, run: Dict[str, Any], calibrator: str) -> Dict[str, Any]:
    """Exports a stored compare run (rebuilt from its run folder) for ``calibrator``.

    What the Export page's "Export now" button does for runs that were not
    exported yet (a CLI ``compare``, or a job with export off).
    """
    from quantlab.evaluation.runs import load_run_info, rebuild, scales_path
    from quantlab.scales import Scales

    info = load_run_info(run.get("run_dir") or run["id"], store.path)
    model, batches, task, _metric, _calib = rebuild(info)
    scales = Scales.load(scales_path(info["run_dir"], calibrator))
    return export_artifacts(
        store, run["id"], model=model, scales=scales, calibrator=calibrator,
        example=task.inputs(batches[0]), out_dir=Path(info["run_dir"]),
        describe={"model": info.get("model"), "data": info.get("data"), "eval_data": info.get("eval_data")},
    )
