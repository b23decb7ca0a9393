"""A whole QAT run: FP32 and PTQ metrics, fine-tuning, QAT metric, artifacts, run store.

This is what ``quantlab qat`` does; it works the same under torchrun (rank 0
evaluates, writes files and the store; every rank trains).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from quantlab._io import write_text_atomic
from quantlab.config import QuantConfig
from quantlab.interrupts import outcome_message, outcome_status
from quantlab.qat import ddp
from quantlab.qat.errors import QATError
from quantlab.qat.loop import TrainConfig, TrainProgress, TrainResult, train
from quantlab.qat.hooks import enabled
from quantlab.qat.prepare import prepare, save
from quantlab.api import current_scales
from quantlab.scales import Scales

RUN_FILE = "run.json"
START_SCALES_FILE = "scales.start.json"
DEFAULT_METRIC = {"classification": "top1", "causal_lm": "perplexity"}


@dataclasses.dataclass
class QATRunResult:
    """Metrics before/after QAT and where everything went."""

    metric: str
    fp32: float
    ptq: float
    qat: float
    calibrator: str
    train: TrainResult
    out_dir: Path
    run_id: Optional[str] = None
    files: Dict[str, Path] = dataclasses.field(default_factory=dict)

    def rows(self, seconds: Dict[str, float]) -> List[Dict[str, Any]]:
        """Run-store result rows: FP32, INT8 PTQ (the starting ranges), INT8 after QAT."""
        return [
            {"precision": "fp32", "calibrator": None, "source": "qat", "metric": self.metric, "value": self.fp32,
             "delta": 0.0, "seconds": seconds.get("fp32")},
            {"precision": "int8", "calibrator": self.calibrator or None, "source": "ptq", "metric": self.metric,
             "value": self.ptq, "delta": self.ptq - self.fp32, "seconds": seconds.get("ptq")},
            {"precision": "int8", "calibrator": self.calibrator or None, "source": "qat", "metric": self.metric,
             "value": self.qat, "delta": self.qat - self.fp32, "seconds": seconds.get("qat")},
        ]


def _evaluate(model: nn.Module, batches: List[Any], metric: str, reference: bool = False) -> Dict[str, float]:
    """Rank 0 evaluates; every rank gets the metrics (the others wait)."""
    import torch.distributed as dist

    from quantlab.evaluation.evaluate import evaluate, evaluate_reference
    from quantlab.evaluation.tasks import task_for_metric

    metrics: List[Any] = [None]
    if ddp.is_main_process():
        task, name = task_for_metric(metric)
        was_training = model.training
        run = evaluate_reference if reference else evaluate
        result = run(model, task, batches)
        model.train(was_training)
        metrics = [{"value": float(result.metrics[name]), "seconds": result.seconds}]
    if ddp.is_distributed():
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


def run_qat(
    model: nn.Module,
    train_data: Any,
    eval_data: Iterable[Any],
    *,
    out_dir: Union[str, Path],
    scales: Union[str, Path, Scales, None] = None,
    calib_data: Optional[Iterable[Any]] = None,
    calibrator: str = "entropy",
    calibrator_params: Optional[Dict[str, Any]] = None,
    quant_config: Optional[QuantConfig] = None,
    calib_max_batches: Optional[int] = None,
    train_config: Optional[TrainConfig] = None,
    learn_amax: bool = False,
    weight_ranges: str = "recompute",
    fold_bn: bool = False,
    metric: Optional[str] = None,
    eval_max_batches: Optional[int] = None,
    resume: bool = False,
    store: Any = None,
    describe: Optional[Dict[str, Optional[str]]] = None,
    progress: Optional[Callable[[TrainProgress], None]] = None,
    folder: Any = None,
) -> QATRunResult:
    """Evaluates FP32 and the starting INT8 model, fine-tunes, evaluates again, saves.

    Args:
        model: The FP32 model on its device.
        train_data: Training Dataset or DataLoader.
        eval_data: Eval batches (the same ones before and after).
        out_dir: Run folder: ``checkpoint.pt``, ``scales.start.json``, the
            :func:`quantlab.qat.save` files and ``run.json`` (metrics).
        scales: Starting ranges; else calibrated from ``calib_data``.
        store: A :class:`quantlab.store.RunStore` to record the run in (rank 0), or None.
        describe: ``model``, ``data``, ``eval_data`` strings for the store.
        resume: Continue an interrupted run in ``out_dir`` (same ranges, same schedule);
            a finished run is refused before anything is recorded.
        folder: A :class:`quantlab.store.RunFolder` on ``out_dir`` the caller holds
            (rank 0); by default one is opened here. The folder is committed twice,
            each time as a whole: before training (starting ranges, run.json) and at
            the end (model, scales, final run.json beside the last checkpoint).
        Other arguments: see :func:`quantlab.qat.prepare` and :class:`TrainConfig`.
    """
    out = Path(out_dir)
    train_config = train_config or TrainConfig()
    metric = metric or DEFAULT_METRIC[train_config.task]
    describe = describe or {}
    main = ddp.is_main_process()
    previous: Dict[str, Any] = {}
    if resume:
        # Refused before anything is recorded or written: a finished run (also a copied folder) is final.
        previous = read_resumable(out)
        if previous.get("metric") != metric:
            raise QATError(f"{out / RUN_FILE}: the run measured {previous.get('metric')!r}, not {metric!r}")
        scales = out / START_SCALES_FILE
    own_folder = folder is None and main
    if own_folder:
        from quantlab.store.runfolder import RunFolder

        folder = RunFolder(out, kind="qat", purpose="quantlab qat" + (" --resume" if resume else ""))
    try:
        return _run_qat(
            model=model, train_data=train_data, eval_data=eval_data, out=out, scales=scales,
            calib_data=calib_data, calibrator=calibrator, calibrator_params=calibrator_params,
            quant_config=quant_config, calib_max_batches=calib_max_batches, train_config=train_config,
            learn_amax=learn_amax, weight_ranges=weight_ranges, fold_bn=fold_bn, metric=metric,
            eval_max_batches=eval_max_batches, resume=resume, store=store, describe=describe,
            progress=progress, previous=previous, folder=folder,
        )
    finally:
        if own_folder:
            folder.close()


def read_resumable(out: Path) -> Dict[str, Any]:
    """The ``run.json`` of an interrupted QAT run in ``out``, checked; refuses a finished one.

    Raises:
        QATError: nothing to resume, a corrupt run.json, or a finished run (nothing is recorded).
    """
    from quantlab.store.runfolder import read_manifest
    from quantlab.validation import check_qat_run, read_json_file

    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise QATError(f"{path}: nothing to resume in {out}")
    previous = read_json_file(path, what="QAT run.json", error=QATError, allow_nan=True)
    check_qat_run(previous, str(path), QATError)
    manifest = read_manifest(out)
    if previous.get("qat") is not None or (manifest is not None and manifest.get("state") == "done"):
        raise QATError(
            f"the QAT run in {out} finished (INT8 after QAT: {previous.get('qat')!r}); there is nothing to resume and its "
            "record stays as it is: start a new run with another --out"
        )
    return previous


def _run_qat(*, model, train_data, eval_data, out, scales, calib_data, calibrator, calibrator_params, quant_config,
             calib_max_batches, train_config, learn_amax, weight_ranges, fold_bn, metric, eval_max_batches,
             resume, store, describe, progress, previous, folder) -> QATRunResult:
    main = ddp.is_main_process()
    eval_batches = list(eval_data) if eval_max_batches is None else _take(eval_data, eval_max_batches)
    seconds: Dict[str, float] = {}
    run_id = None
    if store is not None and main:
        # A resumed run is a new record whose parent is the interrupted one (never rewritten).
        parent = previous.get("run_id")
        if parent is not None:
            try:
                store.get_run(parent)
            except Exception:  # noqa: BLE001 - a copied folder or a store entry that is gone: no parent
                parent = None
        run_id = store.create_run(
            "qat", model=describe.get("model") or type(model).__name__, data=describe.get("data"),
            eval_data=describe.get("eval_data"), run_dir=out, parent_id=parent,
            config={"train": train_config.to_dict(), "learn_amax": learn_amax, "weight_ranges": weight_ranges,
                    "fold_bn": fold_bn, "calibrator": calibrator, "metric": metric, "resumed": bool(resume),
                    "quant_config": quant_config.to_dict() if quant_config else None},
        )
        if folder is not None:
            folder.run_id, folder.store = run_id, str(store.path)
    try:
        if isinstance(scales, (str, Path)):
            scales = Scales.load(scales)  # ScalesFormatError names the file
        start_calibrator = scales.calibrator if scales is not None else calibrator
        # Prepared first, so scales that do not fit the model fail before any evaluation.
        prepare(model, scales=scales, data=calib_data if scales is None else None, calibrator=calibrator,
                calibrator_params=calibrator_params, config=quant_config, max_batches=calib_max_batches,
                learn_amax=learn_amax, weight_ranges=weight_ranges, fold_bn=fold_bn,
                freeze_bn_after=train_config.freeze_bn_after)
        if resume:
            fp32 = {"value": previous["fp32"], "seconds": previous.get("seconds", {}).get("fp32")}
        else:
            with enabled(model, False):  # the FP32 model (folded BatchNorms compute conv + BN exactly)
                fp32 = _evaluate(model, eval_batches, metric, reference=True)
        if resume:
            ptq = {"value": previous["ptq"], "seconds": previous.get("seconds", {}).get("ptq")}
        else:
            # Saved before training, so a resumed run starts from exactly these ranges.
            start = current_scales(model, calibrator=start_calibrator)
            ptq = _evaluate(model, eval_batches, metric)
            if main:  # committed before training: a kill from here on leaves a resumable folder
                stage = folder.stage()
                start.save(stage / START_SCALES_FILE)
                _write_run_file(stage, run_id, metric, fp32, ptq, start_calibrator)
                folder.commit(state="training")
        seconds.update({"fp32": fp32["seconds"], "ptq": ptq["seconds"]})

        def report(p: TrainProgress) -> None:
            if progress is not None:
                progress(p)
            if store is not None and main and run_id is not None and (p.step % max(1, p.total_steps // 50) == 0):
                store.set_status(run_id, "running", progress=p.step / p.total_steps)

        result = train(model, train_data, train_config, checkpoint_dir=out, resume=resume, progress=report)
        ddp.check_ranges_agree(model)  # a diverged rank is an error, not a silently different scales file
        after = _evaluate(model, eval_batches, metric)
        seconds["qat"] = after["seconds"]
        files: Dict[str, Path] = {}
        if main:  # the final files beside the checkpoint, committed together with the final run.json
            stage = folder.stage(base="current")
            files = {role: folder.final(path) for role, path in save(model, stage).items()}
        outcome = QATRunResult(metric=metric, fp32=fp32["value"], ptq=ptq["value"], qat=after["value"],
                               calibrator=start_calibrator, train=result, out_dir=out,
                               run_id=run_id, files=files)
        if main:
            _write_run_file(stage, run_id, metric, fp32, ptq, outcome.calibrator, after=after, train=result)
            folder.commit(state="done")
        ddp.barrier()
        if main:
            if store is not None and run_id is not None:
                store.add_results(run_id, outcome.rows(seconds))
                store.add_artifact(run_id, "scales", files["scales"])
                store.add_artifact(run_id, "checkpoint", files["weights"])
                store.set_status(run_id, "done", progress=1.0)
        return outcome
    except BaseException as exc:
        if store is not None and main and run_id is not None:
            message = outcome_message(exc) + (" (resume with --resume)" if isinstance(exc, KeyboardInterrupt) else "")
            try:
                store.set_status(run_id, outcome_status(exc), error=message)
            except Exception:  # noqa: BLE001 - never hide the original error behind a store error
                pass
        raise


def _take(data: Iterable[Any], n: int) -> List[Any]:
    out = []
    for batch in data:
        if len(out) >= n:
            break
        out.append(batch)
    return out


def _write_run_file(out: Path, run_id, metric, fp32, ptq, calibrator, after=None, train: Optional[TrainResult] = None) -> None:
    data = {
        "run_id": run_id, "metric": metric, "calibrator": calibrator,
        "fp32": fp32["value"], "ptq": ptq["value"], "qat": after["value"] if after else None,
        "seconds": {"fp32": fp32["seconds"], "ptq": ptq["seconds"], "qat": after["seconds"] if after else None},
        "steps": train.steps if train else None, "train_seconds": train.seconds if train else None,
        "final_loss": train.losses[-1] if train and train.losses else None,
        "world_size": ddp.world_size(),
        # Mean over ranks, one per step (a resumed run keeps the steps before the interruption).
        "losses": list(train.losses) if train else None,
    }
    write_text_atomic(out / RUN_FILE, json.dumps(data, indent=1))
