"""Recorded compare runs: finding one, rebuilding its model/data/task, reading its files.

A compare run folder holds ``run.json`` (the specs: model, data, eval data,
metric, batch size, eval batches), ``scales.<calibrator>.json`` and
``results.json``; sensitivity and autoprecision add their own files beside them.
The jobs that start from a recorded run (sensitivity, autoprecision, report,
export of a stored run, the dashboard's mixed precision) read it through here.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from torch import nn

from quantlab.errors import FileFormatError
from quantlab.validation import check_results, check_run_info, read_json_file

PathLike = Union[str, Path]


class RunFolderError(FileFormatError):
    """A run folder is missing a file or the file is corrupt."""


def read_run_file(path: PathLike, check: Optional[Callable[..., None]] = None, *, what: Optional[str] = None) -> Dict[str, Any]:
    """A JSON file of a run folder: bounded, parsed, its schema checked (``check(data, where, error)``).

    Raises:
        RunFolderError: missing, too big, not JSON, or a field of the wrong type or bounds.
    """
    path = Path(path)
    data = read_json_file(path, what=what or path.name, error=RunFolderError, allow_nan=True)
    if check is not None:
        check(data, str(path), RunFolderError)
    elif not isinstance(data, dict):
        raise RunFolderError(f"{path}: must hold a JSON object")
    return data


def _read_json(path: Path, check: Optional[Callable[..., None]] = None) -> Dict[str, Any]:
    return read_run_file(path, check)


def load_run_info(ref: PathLike, store_path: Optional[PathLike] = None) -> Dict[str, Any]:
    """``run.json`` of a compare run given by its folder or its run id (looked up in the store).

    A sensitivity/autoprecision run id resolves to its parent compare run.

    Raises:
        RunFolderError: the folder has no (valid) run.json.
        RunNotFoundError: the id is not in the store.
    """
    from quantlab.store import RunStore

    folder = Path(ref)
    if not (folder / "run.json").is_file():
        if folder.is_dir():
            raise RunFolderError(f"{folder} has no run.json: pass the folder given to `quantlab compare --out` or a run id")
        store = RunStore(store_path)
        run = store.find_run(str(ref))
        if run["kind"] != "compare" and run.get("parent_id"):
            run = store.get_run(run["parent_id"])
        if not run.get("run_dir"):
            raise RunFolderError(f"run '{ref}' has no run folder recorded")
        folder = Path(run["run_dir"])
        if not (folder / "run.json").is_file():
            raise RunFolderError(f"run '{ref}' points at {folder}, which has no run.json (moved or deleted?)")
    info = _read_json(folder / "run.json", check_run_info)
    info["run_dir"] = str(folder.resolve())
    return info


def read_results(run_dir: PathLike) -> Dict[str, Any]:
    """``results.json`` of a compare run folder."""
    return _read_json(Path(run_dir) / "results.json", check_results)


def rebuild(info: Dict[str, Any], *, device: Optional[str] = None, need_calib: bool = False) -> Tuple[nn.Module, list, Any, str, Any]:
    """Model, eval batches, task, metric (and calibration data) of a recorded compare run.

    The same specs, batch size and number of eval batches give the same batches.
    """
    from quantlab.data import load_data
    from quantlab.evaluation.tasks import batches_of, task_for_metric
    from quantlab.model_source import is_torchscript_spec, load_model

    if not info.get("model") or not info.get("eval_data"):
        raise RunFolderError(
            f"run {info.get('run_id')} was recorded without model and eval data specs (created from Python?): "
            "rebuild it with the Python API"
        )
    batch_size = int(info.get("batch_size") or 64)
    example = None
    if is_torchscript_spec(info["model"]):  # converting TorchScript needs a batch; no factory registers data
        from quantlab.batching import split_batch

        example = split_batch(next(iter(load_data(info["eval_data"], batch_size=2))))[0]
    model = load_model(info["model"], weights=info.get("weights"), device=device or info.get("device"), example_inputs=example)
    eval_batches = batches_of(load_data(info["eval_data"], batch_size=batch_size), info.get("eval_batches"))
    metric = info["metric"]
    params = (info.get("task") or {}).get("params") or {}
    task, metric = task_for_metric(metric, **({} if ":" in metric else params))
    calib = load_data(info["data"], batch_size=batch_size) if need_calib and info.get("data") else None
    return model, eval_batches, task, metric, calib


def calibrator_of(info: Dict[str, Any], requested: Optional[str] = None) -> str:
    """The requested calibrator (checked against the run's) or the run's best by its metric."""
    calibrators = list(info.get("calibrators") or [])
    if requested:
        if requested not in calibrators:
            raise RunFolderError(f"calibrator {requested!r} is not in run {info.get('run_id')} (it has {', '.join(calibrators) or 'none'})")
        return requested
    best = read_results(info["run_dir"]).get("best_calibrator")
    if not best:
        raise RunFolderError(f"run {info.get('run_id')} has no INT8 results: run compare with int8 in --precisions")
    return best


def full_source(info: Dict[str, Any]) -> str:
    """The source of a run's full INT8 pipeline: ``"ptq"``, or ``"ptq+cle+..."`` with every algorithm it ran."""
    return "+".join(["ptq"] + list(info.get("algorithms") or []))


def _file_source(info: Optional[Dict[str, Any]], source: Optional[str]) -> Optional[str]:
    """The source part of a variant's file names: none for the full pipeline (plain names)."""
    if source is None or info is None or source == full_source(info):
        return None
    return source


def scales_path(run_dir: PathLike, calibrator: str, source: Optional[str] = None, info: Optional[Dict[str, Any]] = None) -> Path:
    """``scales.<calibrator>.json``; another pipeline prefix's (``source``) is ``scales.<calibrator>.<source>.json``."""
    from quantlab.checkpoint import scales_name

    return Path(run_dir) / scales_name(calibrator, _file_source(info, source) if info is not None else source)


def checkpoint_path(run_dir: PathLike, calibrator: str, source: Optional[str] = None, info: Optional[Dict[str, Any]] = None) -> Path:
    """``model.<calibrator>.safetensors`` (or ``model.<calibrator>.<source>.safetensors``) beside the scales."""
    from quantlab.checkpoint import checkpoint_name

    return Path(run_dir) / checkpoint_name(calibrator, _file_source(info, source) if info is not None else source)


def sensitivity_path(run_dir: PathLike, calibrator: str) -> Path:
    return Path(run_dir) / f"sensitivity.{calibrator}.json"


def autoprecision_dir(run_dir: PathLike, calibrator: str, source: Optional[str] = None) -> Path:
    return Path(run_dir) / (f"autoprecision.{calibrator}" if not source else f"autoprecision.{calibrator}.{source}")


def choose_variant(info: Dict[str, Any], calibrator: Optional[str] = None, start: str = "best") -> Tuple[str, str]:
    """``(calibrator, source)`` of the INT8 row to start from.

    Args:
        calibrator: A calibrator of the run (None: the best by the run's metric).
        start: ``"best"`` (the best INT8 PTQ row: with algorithm rows, whichever prefix
            of the pipeline measured best) or a row's source (``"ptq"``, ``"ptq+cle"``).

    Raises:
        RunFolderError: an unknown calibrator or source, or no INT8 rows.
    """
    results = read_results(info["run_dir"])
    metric = info["metric"]
    rows = [r for r in results.get("rows", []) if r["precision"] == "int8" and r.get("metric") == metric
            and (r.get("source") or "ptq").startswith("ptq") and r.get("calibrator")]
    sources = list(dict.fromkeys(r.get("source") or "ptq" for r in rows))
    if start != "best" and start not in sources:
        raise RunFolderError(f"--from {start!r}: run {info.get('run_id')} has INT8 rows from {', '.join(sources) or 'none'} (or use best)")
    if calibrator is not None:
        calibrator = calibrator_of(info, calibrator)
    candidates = [r for r in rows if (start == "best" or (r.get("source") or "ptq") == start)
                  and (calibrator is None or r["calibrator"] == calibrator)]
    if not candidates:
        if calibrator is None and start == "best":
            return calibrator_of(info), full_source(info)
        raise RunFolderError(f"run {info.get('run_id')} has no INT8 row for {calibrator or 'any calibrator'} from {start}")
    sign = 1.0 if results.get("higher_is_better", True) else -1.0
    values = [float(r["value"]) for r in candidates]
    best = max(range(len(candidates)), key=lambda i: (sign * values[i] if values[i] == values[i] else float("-inf"), -i))
    return candidates[best]["calibrator"], candidates[best].get("source") or "ptq"


def quantized_copy(model: nn.Module, info: Dict[str, Any], calibrator: str, source: Optional[str] = None) -> nn.Module:
    """A deep copy of ``model`` quantized with the run's scales for ``calibrator`` (and ``source``'s pipeline).

    Where algorithms changed the weights, the copy is rebuilt from the run's checkpoint
    (:func:`quantlab.checkpoint.load_checkpoint`): the scales alone fit those weights only.

    Raises:
        RunFolderError: the scales say the weights changed but their checkpoint is missing.
    """
    from quantlab.api import load_scales
    from quantlab.checkpoint import load_checkpoint
    from quantlab.config import QuantConfig
    from quantlab.scales import Scales

    path = scales_path(info["run_dir"], calibrator, source, info)
    checkpoint = checkpoint_path(info["run_dir"], calibrator, source, info)
    scales = Scales.load(path)
    if checkpoint.is_file():
        return load_checkpoint(copy.deepcopy(model), checkpoint)
    if scales.changed_weights():
        names = [r.get("name") for r in scales.algorithms.get("transforms", []) + scales.algorithms.get("refinements", [])]
        raise RunFolderError(f"{path} fits weights changed by {', '.join(map(str, names))}, but their checkpoint {checkpoint} is missing")
    if scales.config is None and info.get("quant_config"):
        scales.config = QuantConfig.from_dict(info["quant_config"])
    return load_scales(copy.deepcopy(model), scales)


@dataclasses.dataclass
class RebuiltRun:
    """A compare run's model, eval batches and task, rebuilt from its run folder."""

    info: Dict[str, Any]
    model: Any
    batches: List[Any]
    task: Any
    metric: str


def rebuild_run(run: Dict[str, Any], store_path: Optional[PathLike] = None) -> RebuiltRun:
    """Rebuilds the FP32 model, eval batches and task of a stored compare run (same specs, same batches)."""
    ref = run.get("run_dir") or run["id"]
    info = load_run_info(ref, store_path)
    model, batches, task, metric, _ = rebuild(info)
    return RebuiltRun(info=info, model=model, batches=batches, task=task, metric=metric)
