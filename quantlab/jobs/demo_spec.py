"""What the demo job runs (a :class:`JobSpec`), and checking it before anything is recorded.

The demo job (:mod:`quantlab.jobs.demo`) is the workbench's main flow on one
model: one statistics pass and every calibrator, FP32/FP16/INT8 on the same eval
data, optionally the sensitivity ranking, and the Q/DQ ONNX export with its
``check`` report and calibration cache. ``quantlab demo`` runs :func:`demo_spec`;
the dashboard's New run page builds a spec from its form. :func:`validate`
imports the model spec and opens the data specs so a typo is reported at once,
before a run exists. The spec is recorded as the run's config under ``"job"``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from quantlab.errors import QuantlabError
from quantlab.jobs.errors import JobInputError

PRECISIONS = ("fp32", "fp16", "int8")
# The demo model: importable from anywhere (no cwd-relative file), cached after its first training.
DEMO_MODEL = "quantlab.models.fmnist:pretrained_fmnist_cnn"
DEMO_EVAL_ENV = "QUANTLAB_DEMO_EVAL_SAMPLES"
DEMO_CALIB_ENV = "QUANTLAB_DEMO_CALIB_SAMPLES"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise JobInputError(name, f"must be a positive integer, got {text!r}")
    return int(text)


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One demo / dashboard job (recorded as the run's config under ``"job"``).

    Attributes:
        model: ``file.py:factory``, ``package.module:factory``, TorchScript ``.pt`` or ``.pt2``.
        calib_data: Calibration data spec (``fmnist:calib``, ``csv:PATH``, ...).
        eval_data: Eval data spec.
        metric: Primary metric (``top1``, ``perplexity``, ... or ``module:function``).
        calibrators: Calibrator names (empty = all registered).
        precisions: Subset of fp32, fp16, int8 (FP32 always runs: it is the reference).
        weights: Optional state_dict file for the model.
        batch_size: Batch size for calibration and eval.
        calib_batches: Use at most this many calibration batches.
        eval_batches: Evaluate at most this many batches.
        sensitivity: Also rank layers by the metric (<= 3 eval passes).
        export: Also export Q/DQ ONNX (best calibrator), its check report and a calibration cache.
        out_dir: The run folder.
        name: A label for the Runs page.
    """

    model: str
    calib_data: str = "fmnist:calib"
    eval_data: str = "fmnist:test[:2000]"
    metric: str = "top1"
    calibrators: List[str] = dataclasses.field(default_factory=list)
    precisions: List[str] = dataclasses.field(default_factory=lambda: list(PRECISIONS))
    weights: Optional[str] = None
    batch_size: int = 128
    calib_batches: Optional[int] = None
    eval_batches: Optional[int] = None
    sensitivity: bool = True
    export: bool = True
    out_dir: str = ""
    name: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "JobSpec":
        """Reads :meth:`to_dict`'s output (a run's recorded config), checking each field's type.

        Raises:
            JobInputError: not a dict, an unknown field, or a field of the wrong type (naming it).
        """
        if not isinstance(data, dict):
            raise JobInputError("job", f"must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise JobInputError("job", f"unknown field(s) {sorted(unknown)}")
        for field, kinds in _FIELD_TYPES.items():
            if field not in data:
                continue
            value = data[field]
            if value is None and type(None) in kinds:
                continue
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise JobInputError(field, f"must be {_TYPE_NAMES[field]}, got {type(value).__name__}")
            if list in kinds and not all(isinstance(item, str) for item in value):
                raise JobInputError(field, "must be a list of strings")
        if "model" not in data:
            raise JobInputError("model", "is missing")
        return cls(**data)


_FIELD_TYPES = {
    "model": (str,), "calib_data": (str,), "eval_data": (str,), "metric": (str,), "calibrators": (list,),
    "precisions": (list,), "weights": (str, type(None)), "batch_size": (int,), "calib_batches": (int, type(None)),
    "eval_batches": (int, type(None)), "sensitivity": (bool,), "export": (bool,), "out_dir": (str,),
    "name": (str, type(None)),
}
_TYPE_NAMES = {
    field: " or ".join("null" if k is type(None) else {str: "a string", list: "a list", int: "an integer",
                                                          bool: "true/false"}[k] for k in kinds)
    for field, kinds in _FIELD_TYPES.items()
}


def default_out_dir(prefix: str = "runs/ui") -> str:
    """A fresh run folder name, e.g. ``runs/ui-20261125-114501``."""
    return f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def demo_spec(out_dir: str = "runs/demo", *, eval_samples: Optional[int] = None, calib_samples: Optional[int] = None) -> JobSpec:
    """The built-in demo: the residual CNN on Fashion-MNIST, every calibrator, FP32/FP16/INT8, export.

    The eval subset (default 2,000 test images, or ``$QUANTLAB_DEMO_EVAL_SAMPLES``)
    keeps the whole job to a minute or two on two CPU cores; calibration uses 512
    images (``$QUANTLAB_DEMO_CALIB_SAMPLES``).
    """
    if eval_samples is None:
        eval_samples = _env_int(DEMO_EVAL_ENV, 2000)
    if calib_samples is None:
        calib_samples = _env_int(DEMO_CALIB_ENV, 512)
    return JobSpec(
        model=DEMO_MODEL,
        calib_data=f"fmnist:calib[:{calib_samples}]",
        eval_data=f"fmnist:test[:{eval_samples}]",
        metric="top1",
        calibrators=[],
        precisions=list(PRECISIONS),
        batch_size=256,
        sensitivity=True,
        export=True,
        out_dir=out_dir,
        name="Fashion-MNIST demo",
    )


def _validate_model(spec: JobSpec) -> None:
    from quantlab.model_source import load_callable

    model = (spec.model or "").strip()
    if not model:
        raise JobInputError("model", "give a model: path/to/file.py:factory, package.module:factory, or a .pt/.pt2 file")
    path = Path(model)
    if ":" not in model or (path.suffix in (".pt", ".pt2", ".ts", ".pth") and ":" not in path.name):
        if path.suffix not in (".pt", ".pt2", ".ts", ".pth"):
            raise JobInputError("model", f"{model!r} is neither module:factory nor a .pt/.pt2 file")
        if not path.is_file():
            raise JobInputError("model", f"model file not found: {model}")
    else:
        try:
            factory = load_callable(model)
        except QuantlabError as exc:
            raise JobInputError("model", str(exc)) from None
        if not callable(factory):
            raise JobInputError("model", f"{model} is a {type(factory).__name__}, not a callable factory")
    if spec.weights and not Path(spec.weights).is_file():
        raise JobInputError("weights", f"weights file not found: {spec.weights}")


def _validate_data(field: str, data_spec: str, batch_size: int) -> None:
    from quantlab.data import load_data

    if not (data_spec or "").strip():
        raise JobInputError(field, "give a data spec, e.g. fmnist:test[:1000] or csv:path/to/file.csv")
    try:
        loader = load_data(data_spec.strip(), batch_size=batch_size)
        next(iter(loader))  # opens the files now: missing or corrupt data is reported here, not in the job
    except StopIteration:
        raise JobInputError(field, f"{data_spec} holds no samples") from None
    except (QuantlabError, ValueError, OSError, KeyError, TypeError, ImportError, ConnectionError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise JobInputError(field, f"{data_spec}: {message}") from None


def validate(spec: JobSpec) -> JobSpec:
    """Checks every field (imports the model spec, opens both data specs); returns a normalized copy.

    Raises:
        JobInputError: naming the field (``model``, ``calibration data``, ``eval data``, ...).
    """
    from quantlab.ptq import parse_calibrators

    precisions = [p.strip().lower() for p in spec.precisions if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise JobInputError("precisions", f"unknown {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    precisions = ["fp32"] + [p for p in PRECISIONS[1:] if p in precisions]
    calibrators: List[str] = []
    if "int8" in precisions:
        try:
            calibrators = parse_calibrators(spec.calibrators or "all")
        except (QuantlabError, KeyError, ValueError) as exc:  # UnknownCalibratorError is a KeyError
            raise JobInputError("calibrators", str(exc)) from None
    if spec.batch_size < 1:
        raise JobInputError("batch size", f"must be >= 1, got {spec.batch_size}")
    for field, value in (("calibration batches", spec.calib_batches), ("eval batches", spec.eval_batches)):
        if value is not None and value < 1:
            raise JobInputError(field, f"must be >= 1 (or empty for all), got {value}")
    metric = (spec.metric or "").strip()
    if ":" not in metric:  # a module:function metric is imported by the job itself
        from quantlab.evaluation.tasks import task_for_metric

        try:
            task_for_metric(metric)
        except (QuantlabError, ValueError) as exc:
            raise JobInputError("metric", str(exc)) from None
    out_dir = (spec.out_dir or "").strip() or default_out_dir()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise JobInputError("run folder", f"{out_dir} exists and is not a folder")
    from quantlab.store.lock import is_locked
    from quantlab.store.runfolder import check_replaceable

    try:
        check_replaceable(out_dir, label="run folder")  # never a folder quantlab did not write
    except QuantlabError as exc:
        raise JobInputError("run folder", str(exc)) from None
    if is_locked(out_dir):
        raise JobInputError("run folder", f"{out_dir} is being written by another run: choose another folder")
    _validate_model(spec)
    if "int8" in precisions:
        _validate_data("calibration data", spec.calib_data, spec.batch_size)
    _validate_data("eval data", spec.eval_data, spec.batch_size)
    return dataclasses.replace(
        spec,
        model=spec.model.strip(),
        calib_data=spec.calib_data.strip(),
        eval_data=spec.eval_data.strip(),
        metric=metric,
        calibrators=calibrators,
        precisions=precisions,
        out_dir=out_dir,
        sensitivity=bool(spec.sensitivity and "int8" in precisions),
        export=bool(spec.export and "int8" in precisions),
    )
