"""A whole QAT run: FP32 and PTQ metrics, fine-tuning, QAT metric, the run folder's files.

This is what ``quantlab qat`` does (the QAT job, :mod:`quantlab.jobs.qat`, records
it in the run store); it works the same under torchrun (rank 0 evaluates and
writes files; every rank trains).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from quantlab._io import write_text_atomic
from quantlab.config import QuantConfig
from quantlab.qat import ddp
from quantlab.qat.checkpoint import CHECKPOINT_FILE
from quantlab.qat.errors import QATError
from quantlab.qat.loop import TrainConfig, TrainProgress, TrainResult, train
from quantlab.qat.loop_graphs import eager_reason
from quantlab.qat.hooks import enabled
from quantlab.qat.prepare import prepare, save
from quantlab.api import current_scales
from quantlab.scales import Scales

RUN_FILE = "run.json"
START_SCALES_FILE = "scales.start.json"
DEFAULT_METRIC = {"classification": "top1", "causal_lm": "perplexity"}
#: ``write_files(write, state=..., base=...)``: see :func:`run_qat`.
FileWriter = Callable[..., Dict[str, Path]]


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
    seconds: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)
    sparse: bool = False  #: the model was 2:4-pruned (quantlab.sparsity): its INT8 rows are "2:4 + INT8"

    def rows(self, seconds: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
        """Run-store result rows: FP32, INT8 PTQ (the starting ranges), INT8 after QAT (``seconds``: default the run's)."""
        seconds = self.seconds if seconds is None else seconds
        ptq_source, qat_source = ("sparse", "sparse-qat") if self.sparse else ("ptq", "qat")
        return [
            {"precision": "fp32", "calibrator": None, "source": "qat", "metric": self.metric, "value": self.fp32,
             "delta": 0.0, "seconds": seconds.get("fp32")},
            {"precision": "int8", "calibrator": self.calibrator or None, "source": ptq_source, "metric": self.metric,
             "value": self.ptq, "delta": self.ptq - self.fp32, "seconds": seconds.get("ptq")},
            {"precision": "int8", "calibrator": self.calibrator or None, "source": qat_source, "metric": self.metric,
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
    run_id: Optional[str] = None,
    progress: Optional[Callable[[TrainProgress], None]] = None,
    prune: Optional[Callable[[nn.Module], Any]] = None,
    write_files: Optional["FileWriter"] = None,
) -> QATRunResult:
    """Evaluates FP32 and the starting INT8 model, fine-tunes, evaluates again, saves.

    Args:
        model: The FP32 model on its device.
        train_data: Training Dataset or DataLoader.
        eval_data: Eval batches (the same ones before and after).
        out_dir: Run folder: ``checkpoint.pt``, ``scales.start.json``, the
            :func:`quantlab.qat.save` files and ``run.json`` (metrics).
        scales: Starting ranges; else calibrated from ``calib_data``.
        resume: Continue an interrupted run in ``out_dir`` (same ranges, same schedule);
            a finished run is refused before anything is written (:func:`read_resumable`).
        run_id: The run store's id of this run, written into ``run.json`` (the QAT job records it).
        prune: ``prune(model)`` makes the model 2:4-sparse (e.g. a call of
            :func:`quantlab.sparsity.prune`), run after the FP32 reference is measured on
            the dense model and before the ranges are set: sparse QAT, whose INT8 rows are
            "2:4 + INT8". (A model pruned before the call is sparse QAT too, but its FP32
            row is then the pruned model's.)
        write_files: How rank 0 writes the run folder's files: ``write_files(write, state=, base=)``
            calls ``write(folder)`` and returns the final paths of what it wrote. The QAT job
            (:func:`quantlab.jobs.qat.run_qat`) stages and commits its locked run folder as a
            whole, twice: before training (starting ranges, run.json; state ``training``) and at
            the end (model, scales, final run.json beside the last checkpoint; state ``done``).
            By default the files go straight into ``out_dir``.
        Other arguments: see :func:`quantlab.qat.prepare` and :class:`TrainConfig`.
    """
    from quantlab.sparsity.mask import masked_layers

    out = Path(out_dir)
    train_config = train_config or TrainConfig()
    metric = metric or DEFAULT_METRIC[train_config.task]
    main = ddp.is_main_process()
    eager_reason(model, train_config.cuda_graphs)  # cuda_graphs="on" where graphs cannot run: refused before any work
    previous: Dict[str, Any] = {}
    if resume:
        # Refused before anything is written: a finished run (also a copied folder) is final.
        previous = read_resumable(out, metric)
        scales = out / START_SCALES_FILE
        if run_id is None:
            run_id = previous.get("run_id")  # not recorded this time: run.json keeps the run it belongs to
    write_files = write_files or direct_writer(out)
    eval_batches = list(eval_data) if eval_max_batches is None else _take(eval_data, eval_max_batches)
    seconds: Dict[str, float] = {}
    if isinstance(scales, (str, Path)):
        scales = Scales.load(scales)  # ScalesFormatError names the file
    start_calibrator = scales.calibrator if scales is not None else calibrator
    dense_fp32 = None
    if prune is not None:
        # The reference is the dense FP32 model: measured before pruning changes it.
        if not resume:
            dense_fp32 = _evaluate(model, eval_batches, metric, reference=True)
        prune(model)
    sparse = bool(masked_layers(model))  # the loop keeps the pattern of a 2:4-pruned model
    # Prepared first, so scales that do not fit the model fail before any evaluation.
    prepare(model, scales=scales, data=calib_data if scales is None else None, calibrator=calibrator,
            calibrator_params=calibrator_params, config=quant_config, max_batches=calib_max_batches,
            learn_amax=learn_amax, weight_ranges=weight_ranges, fold_bn=fold_bn,
            freeze_bn_after=train_config.freeze_bn_after)
    if resume:
        fp32 = {"value": previous["fp32"], "seconds": previous.get("seconds", {}).get("fp32")}
    elif dense_fp32 is not None:
        fp32 = dense_fp32
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

            def write_start(folder: Path) -> Dict[str, Path]:
                return {"start_scales": start.save(folder / START_SCALES_FILE),
                        "run": _write_run_file(folder, run_id, metric, fp32, ptq, start_calibrator)}

            write_files(write_start, state="training", base="new")
    seconds.update({"fp32": fp32["seconds"], "ptq": ptq["seconds"]})

    # A run stopped after its "training" commit but before its first checkpoint restarts training from
    # step 0 (the same starting ranges and seed: the same run); otherwise it continues from the checkpoint.
    continues = resume and (out / CHECKPOINT_FILE).is_file()
    result = train(model, train_data, train_config, checkpoint_dir=out, resume=continues, progress=progress)
    ddp.check_ranges_agree(model)  # a diverged rank is an error, not a silently different scales file
    after = _evaluate(model, eval_batches, metric)
    seconds["qat"] = after["seconds"]
    files: Dict[str, Path] = {}
    if main:  # the final files beside the checkpoint, committed together with the final run.json

        def write_final(folder: Path) -> Dict[str, Path]:
            saved = dict(save(model, folder))
            _write_run_file(folder, run_id, metric, fp32, ptq, start_calibrator, after=after, train=result)
            return saved

        files = write_files(write_final, state="done", base="current")
    ddp.barrier()
    return QATRunResult(metric=metric, fp32=fp32["value"], ptq=ptq["value"], qat=after["value"],
                        calibrator=start_calibrator, train=result, out_dir=out,
                        run_id=run_id, files=files, seconds=dict(seconds), sparse=sparse)


def direct_writer(out: Path) -> FileWriter:
    """A ``write_files`` that writes straight into ``out`` (no staging: for QAT called outside the QAT job)."""

    def write_files(write: Callable[[Path], Dict[str, Path]], *, state: str = "complete", base: str = "new") -> Dict[str, Path]:
        out.mkdir(parents=True, exist_ok=True)
        return dict(write(out) or {})

    return write_files


def read_resumable(out: Path, metric: Optional[str] = None) -> Dict[str, Any]:
    """The ``run.json`` of an interrupted QAT run in ``out`` (its ``run_id`` included), checked; refuses a finished one.

    Args:
        out: The run folder.
        metric: The metric the resumed run measures (None: not checked).

    Raises:
        QATError: nothing to resume, a corrupt run.json, a finished run (nothing is written
            or recorded: its record stays as it is), or a run that measured another metric.
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
    if metric is not None and previous.get("metric") != metric:
        raise QATError(f"{path}: the run measured {previous.get('metric')!r}, not {metric!r}")
    return previous


def _take(data: Iterable[Any], n: int) -> List[Any]:
    out = []
    for batch in data:
        if len(out) >= n:
            break
        out.append(batch)
    return out


def _write_run_file(out: Path, run_id, metric, fp32, ptq, calibrator, after=None, train: Optional[TrainResult] = None) -> Path:
    data = {
        "run_id": run_id, "metric": metric, "calibrator": calibrator,
        "fp32": fp32["value"], "ptq": ptq["value"], "qat": after["value"] if after else None,
        "seconds": {"fp32": fp32["seconds"], "ptq": ptq["seconds"], "qat": after["seconds"] if after else None},
        "steps": train.steps if train else None, "train_seconds": train.seconds if train else None,
        "final_loss": train.losses[-1] if train and train.losses else None,
        "world_size": ddp.world_size(),
        # Mean over ranks, one per step (a resumed run keeps the steps before the interruption).
        "losses": list(train.losses) if train else None,
        # Whether the steps replayed CUDA graphs (this call of the loop: a resumed run's own steps).
        "cuda_graphs": train.cuda_graphs if train else None,
    }
    return write_text_atomic(out / RUN_FILE, json.dumps(data, indent=1))
