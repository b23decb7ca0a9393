"""The compare job: :func:`quantlab.evaluation.compare.compare`, recorded, with its run folder.

The run folder is checked and locked before any work (a second writer, or a
folder quantlab did not write, is refused before anything is loaded or
recorded). The run is recorded (kind ``compare``) once the FP32 pass has
validated the model, data and metric, so bad input leaves the store and the run
folder untouched; each configuration's rows are recorded as they are measured.
The run folder holds ``run.json`` (how to redo it), ``scales.<calibrator>.json``
and ``results.json``, committed as a whole (:mod:`quantlab.jobs.folders`): a
kill leaves the previous folder or the new one; the files are recorded as the
run's artifacts once they are there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from quantlab._io import write_text_atomic
from quantlab.evaluation.compare import CompareResult, ResultRow, compare
from quantlab.evaluation.layers import LayerError
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.folders import JOB_FILES, commit_files, open_run_folder
from quantlab.jobs.recorder import RecordedRun, Recorder

OpenRun = Callable[[Dict[str, Any]], RecordedRun]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_config(settings: Dict[str, Any], describe: Dict[str, Any]) -> Dict[str, Any]:
    """The run's config: what compare measured, plus the caller's specs (weights, device, batch size, ...)."""
    return {**settings, **{k: v for k, v in describe.items() if k not in ("model", "data", "eval_data")}}


def description(model: nn.Module, settings: Dict[str, Any], describe: Dict[str, Any], run_dir: Any) -> RunDescription:
    """The compare run's :class:`RunDescription` (``describe`` gives the model/data specs and a name)."""
    return RunDescription(
        kind=RunKind.COMPARE,
        model=str(describe.get("model") or type(model).__name__),
        data=describe.get("data"),
        eval_data=describe.get("eval_data"),
        name=describe.get("name"),
        run_dir=str(Path(run_dir)) if run_dir is not None else None,
        config=run_config(settings, describe),
    )


def run_compare(
    model: nn.Module,
    calib_data: Optional[Iterable[Any]],
    eval_data: Iterable[Any],
    *,
    store: Any = None,
    run_dir: Optional[Union[str, Path]] = None,
    describe: Optional[Dict[str, Any]] = None,
    folder: Any = None,
    inputs: Optional[Dict[str, Any]] = None,
    **options: Any,
) -> CompareResult:
    """Compares FP32/FP16/INT8 (see :func:`quantlab.evaluation.compare.compare` for ``options``) and records it.

    Args:
        model, calib_data, eval_data: As for :func:`~quantlab.evaluation.compare.compare`.
        store: A :class:`quantlab.store.RunStore`, None for the default store, or
            False to record nothing.
        run_dir: Run folder for run.json, scales and results.json (None: not written).
        describe: Strings recorded with the run: ``model``, ``data``, ``eval_data``,
            ``name`` and anything else for ``run.json`` (the CLI passes its specs).
        folder: The run folder on ``run_dir``, already opened by the caller
            (:func:`quantlab.jobs.folders.open_run_folder`: the CLI takes it before loading
            the model); by default it is opened here, before any work.
        inputs: ``{label: path}`` of the run's inputs (none may lie in the folder), when opened here.
        options: ``metric``, ``task``, ``calibrators``, ``precisions``, ``config``,
            ``calib_batches``, ``eval_batches``, ``calibrator_params``, ``layer_batches``,
            ``extra_candidates``, ``progress``.

    Returns:
        The :class:`CompareResult` with ``run_id`` and ``run_dir`` set.

    Raises:
        OutputPathError / RunLockedError: ``run_dir`` cannot be written (before any work).
        EvaluationError / MetricError: the model, data or metric do not fit (before anything is recorded).
    """
    own_folder = folder is None and run_dir is not None
    if own_folder:
        folder = open_run_folder(run_dir, kind="compare", inputs=inputs, keep=JOB_FILES)
    try:
        if store is None:
            from quantlab.store import RunStore

            store = RunStore()
        recorder = Recorder(store)
        describe = dict(describe or {})
        with contextlib.ExitStack() as stack:

            def open_run(settings: Dict[str, Any]) -> RecordedRun:
                return stack.enter_context(recorder.run(description(model, settings, describe, run_dir)))

            return compare_into(open_run, model, calib_data, eval_data, run_dir=run_dir, describe=describe,
                                folder=folder, **options)
    finally:
        if own_folder:
            folder.close()


def compare_into(
    open_run: OpenRun,
    model: nn.Module,
    calib_data: Optional[Iterable[Any]],
    eval_data: Iterable[Any],
    *,
    run_dir: Optional[Union[str, Path]],
    describe: Dict[str, Any],
    folder: Any = None,
    record_progress: bool = True,
    **options: Any,
) -> CompareResult:
    """Measures and records into the run ``open_run(settings)`` gives once the reference pass validated the input.

    :func:`run_compare` opens a new run there; the demo job hands over the run it
    already records (``record_progress=False``: its own progress covers compare's share).
    ``folder`` is the open run folder on ``run_dir`` (opened here when None).
    """
    own_folder = folder is None and run_dir is not None
    if own_folder:
        folder = open_run_folder(run_dir, kind="compare", keep=JOB_FILES)
    try:
        run: Optional[RecordedRun] = None

        def on_reference(settings: Dict[str, Any]) -> None:
            nonlocal run
            run = open_run(settings)

        def on_rows(rows: List[ResultRow], fraction: float) -> None:
            run.results([r.to_dict() for r in rows])
            if record_progress:
                run.progress(fraction)

        def on_layers(calibrator: str, errors: List[LayerError]) -> None:
            run.layer_stats([e.to_row(calibrator) for e in errors])

        result = compare(model, calib_data, eval_data, on_reference=on_reference, on_rows=on_rows, on_layers=on_layers, **options)
        result.run_id = run.run_id
        result.run_dir = Path(run_dir) if run_dir is not None else None
        if result.run_dir is not None:
            write_run_folder(result, run, run_config(result.settings, describe), describe, folder)
        return result
    finally:
        if own_folder:
            folder.close()


def write_run_folder(result: CompareResult, run: RecordedRun, config: Dict[str, Any], describe: Dict[str, Any],
                     folder: Any) -> None:
    """``run.json``, ``scales.<calibrator>.json`` and ``results.json``: staged, committed as a whole
    into ``folder`` (an open :class:`quantlab.store.RunFolder` on ``result.run_dir``), then recorded as artifacts."""

    def write(stage: Path) -> Dict[str, Path]:
        staged: Dict[str, Path] = {}
        scales_paths: Dict[str, str] = {}
        if result.ptq is not None:
            for name, path in result.ptq.save(stage).items():
                staged[f"scales.{name}"] = path
                scales_paths[name] = str(folder.final(path))  # where it is once committed
        run_info = {
            "run_id": result.run_id,
            "store": str(run.store_path) if run.store_path is not None else None,
            "kind": "compare",
            "model": describe.get("model"),
            "data": describe.get("data"),
            "eval_data": describe.get("eval_data"),
            **config,
        }
        write_text_atomic(stage / "run.json", json.dumps(_json_safe(run_info), indent=1))
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
        staged["results"] = write_text_atomic(stage / "results.json", json.dumps(_json_safe(results), indent=1))
        return staged

    for name, path in commit_files(folder, write, run=run).items():  # recorded once committed: the files are there
        run.artifact("results" if name == "results" else "scales", path)


__all__ = ["compare_into", "description", "run_compare", "run_config", "write_run_folder"]
