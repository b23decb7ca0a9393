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

With ``sparsity`` (a :class:`quantlab.sparsity.compare.SparseCompare`) the run also
gets "2:4 + INT8" rows (source ``sparse``: a pruned, calibrated copy per calibrator)
and, on a CUDA device with cuSPARSELt, ``latency_ms`` rows of FP16 against the 2:4
INT8 model, all recorded in the same run.
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
from quantlab.errors import ConfigError
from quantlab.evaluation.compare import PRECISIONS, CompareResult, ResultRow, compare, parse_precisions
from quantlab.evaluation.layer_info import describe_layers
from quantlab.evaluation.layers import LayerError
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.folders import JOB_FILES, commit_files, open_run_folder
from quantlab.jobs.recorder import RecordedRun, Recorder
from quantlab.sparsity.compare import SOURCE as SPARSE_SOURCE
from quantlab.sparsity.compare import SparseCompare, SparseOutcome, measure_sparse_speed, sparse_candidates

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
    sparsity: Optional[SparseCompare] = None,
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
        sparsity: Add "2:4 + INT8" rows (and their GPU speed where measurable); what
            they did is ``result.sparsity`` (a :class:`~quantlab.sparsity.compare.SparseOutcome`).
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
        ConfigError / SparsityError: 2:4 rows without INT8, or a selection that cannot be pruned
            (before anything is recorded).
    """
    describe = dict(describe or {})
    if sparsity is not None:
        if "int8" not in parse_precisions(options.get("precisions", PRECISIONS)):
            raise ConfigError("2:4 sparsity adds 2:4 + INT8 rows: keep int8 in the precisions")
        sparsity.validate(model)
        describe.update(sparsity.settings())
    own_folder = folder is None and run_dir is not None
    if own_folder:
        folder = open_run_folder(run_dir, kind="compare", inputs=inputs, keep=JOB_FILES)
    try:
        if store is None:
            from quantlab.store import RunStore

            store = RunStore()
        recorder = Recorder(store)
        with contextlib.ExitStack() as stack:

            def open_run(settings: Dict[str, Any]) -> RecordedRun:
                return stack.enter_context(recorder.run(description(model, settings, describe, run_dir)))

            return compare_into(open_run, model, calib_data, eval_data, run_dir=run_dir, describe=describe,
                                folder=folder, sparsity=sparsity, **options)
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
    sparsity: Optional[SparseCompare] = None,
    **options: Any,
) -> CompareResult:
    """Measures and records into the run ``open_run(settings)`` gives once the reference pass validated the input.

    :func:`run_compare` opens a new run there; the demo job hands over the run it
    already records (``record_progress=False``: its own progress covers compare's share).
    ``folder`` is the open run folder on ``run_dir`` (opened here when None).
    """
    sparse: Optional[SparseOutcome] = None
    pruned: List[nn.Module] = []
    if sparsity is not None:
        sparse = SparseOutcome()
        options["extra_candidates"] = _with_sparse_rows(options.get("extra_candidates"), model, calib_data, sparsity,
                                                        sparse, pruned, options)
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
        if sparse is not None:
            if pruned and sparsity.measure_speed:
                # The kept copy holds the last calibrator's ranges (its rows were evaluated in order).
                calibrator = next((r.calibrator for r in reversed(result.rows) if r.source == SPARSE_SOURCE), None)
                measured = measure_sparse_speed(pruned[0], eval_data, calibrator)
                sparse.speed, sparse.speed_note, sparse.rows = measured.speed, measured.speed_note, measured.rows
                run.results(sparse.rows)
                result.rows.extend(ResultRow(**row) for row in sparse.rows)
            pruned.clear()
            result.sparsity = sparse
        result.run_id = run.run_id
        result.run_dir = Path(run_dir) if run_dir is not None else None
        if result.run_dir is not None:
            write_run_folder(result, run, run_config(result.settings, describe), describe, folder,
                             layer_info=describe_layers(model))
        return result
    finally:
        if own_folder:
            folder.close()


def _with_sparse_rows(
    extra: Optional[Callable[[Any], Iterable[Any]]],
    model: nn.Module,
    calib_data: Optional[Iterable[Any]],
    sparsity: SparseCompare,
    outcome: SparseOutcome,
    pruned: List[nn.Module],
    options: Dict[str, Any],
) -> Callable[[Any], Iterable[Any]]:
    """compare's ``extra_candidates``: the caller's own (if any), then a 2:4 + INT8 candidate per calibrator."""
    from quantlab.ptq import parse_calibrators

    sparse = sparse_candidates(
        model, calib_data, calibrators=parse_calibrators(options.get("calibrators", "all")), method=sparsity.method,
        include=sparsity.include, exclude=sparsity.exclude, config=options.get("config"),
        calib_batches=options.get("calib_batches"), calibrator_params=options.get("calibrator_params"),
        reports=outcome.reports, keep=pruned if sparsity.measure_speed else None,
    )

    def candidates(ptq: Any) -> Iterable[Any]:
        if extra is not None:
            yield from extra(ptq)
        yield from sparse(ptq)

    return candidates


def write_run_folder(result: CompareResult, run: RecordedRun, config: Dict[str, Any], describe: Dict[str, Any],
                     folder: Any, *, layer_info: Optional[Dict[str, str]] = None) -> None:
    """``run.json``, ``scales.<calibrator>.json`` and ``results.json``: staged, committed as a whole
    into ``folder`` (an open :class:`quantlab.store.RunFolder` on ``result.run_dir``), then recorded as artifacts.

    ``layer_info`` (module name -> "Conv2d 1→32 3×3") goes into ``results.json`` for the dashboard's layer labels.
    """

    def write(stage: Path) -> Dict[str, Path]:
        staged: Dict[str, Path] = {}
        scales_paths: Dict[str, str] = {}
        checkpoints: Dict[str, str] = {}
        if result.ptq is not None:
            for label, path in save_variants(result, stage).items():
                staged[label] = path
                kind, _, key = label.partition(".")
                (scales_paths if kind == "scales" else checkpoints)[key] = str(folder.final(path))  # where it is once committed
        run_info = {
            "run_id": result.run_id,
            "store": str(run.store_path) if run.store_path is not None else None,
            "kind": "compare",
            "model": describe.get("model"),
            "data": describe.get("data"),
            "eval_data": describe.get("eval_data"),
            **config,
        }
        if result.variants and len(result.variants) > 1:
            run_info["algorithm_reports"] = algorithm_reports(result)
        write_text_atomic(stage / "run.json", json.dumps(_json_safe(run_info), indent=1))
        results = {
            "run_id": result.run_id,
            "metric": result.metric,
            "higher_is_better": result.higher_is_better,
            "best_calibrator": result.best_calibrator,
            "best_source": result.best_row.source if result.best_row is not None else None,
            "rows": [r.to_dict() for r in result.rows],
            "statistics": None if result.ptq is None else {
                "num_batches": result.ptq.num_batches,
                "statistics_seconds": result.ptq.statistics_seconds,
                "calibrate_seconds": result.ptq.calibrate_seconds,
            },
            "scales": scales_paths,
            "checkpoints": checkpoints,
            "algorithms": algorithm_reports(result),
            "layers": {name: [dataclasses.asdict(e) for e in errs] for name, errs in result.layer_errors.items()},
            "layer_info": dict(layer_info or {}),
        }
        staged["results"] = write_text_atomic(stage / "results.json", json.dumps(_json_safe(results), indent=1))
        return staged

    for name, path in commit_files(folder, write, run=run).items():  # recorded once committed: the files are there
        run.artifact({"results": "results", "model": "checkpoint"}.get(name.split(".")[0], "scales"), path)


def algorithm_reports(result: CompareResult) -> Dict[str, Any]:
    """What the PTQ algorithms did in each INT8 pipeline: ``{source: {"transforms": [...], "refinements": {calibrator: [...]}}}``."""
    return {source: {"transforms": [r.to_dict() for r in v.ptq.transforms],
                     "refinements": {name: [r.to_dict() for r in reports] for name, reports in v.ptq.refinements.items()}}
            for source, v in result.variants.items() if v.algorithms}


def save_variants(result: CompareResult, folder: Path) -> Dict[str, Path]:
    """Each INT8 pipeline's scales (and checkpoints where algorithms changed the weights) into ``folder``.

    The full pipeline (every algorithm) gets the plain names (``scales.<calibrator>.json``,
    ``model.<calibrator>.safetensors``); shorter prefixes add their source
    (``scales.<calibrator>.ptq+cle.json``). Returns ``{file stem: path}``.
    """
    from quantlab.checkpoint import save_ptq_files

    if not result.variants:
        return {f"scales.{name}": path for name, path in result.ptq.save(folder).items()}
    full = list(result.variants)[-1]
    written: Dict[str, Path] = {}
    for source, variant in result.variants.items():
        written.update(save_ptq_files(variant.ptq, variant.model, folder, source=None if source == full else source,
                                      row_source=source))
    return written


__all__ = ["algorithm_reports", "compare_into", "description", "run_compare", "run_config", "save_variants",
           "write_run_folder"]
