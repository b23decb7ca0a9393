"""Deployment cost of an EXPORTED model file: latency per batch and size, measured where it will run.

PyTorch fake-quant wall time says nothing about deployment (fake quantization
adds work; FP16 on a CPU is emulated). What a practitioner needs is the cost of
the file they ship, in the runtime that runs it:

* ONNX Runtime on this CPU (:class:`quantlab.runtimes.onnxruntime.runner.OnnxRuntimeRunner`):
  the FP32 and FP16 ONNX files and the INT8 file in the exact integer form ONNX
  Runtime computes here (u8s8 / u8u8 / qdq-float, chosen per CPU by
  :mod:`quantlab.runtimes.onnxruntime.forms`). Latency per batch at batch 1 and at
  the user's batch size: ``warmup`` runs first, then ``repeats`` timed runs of the
  same batch; min and median reported (the median is the typical cost, the min the
  least disturbed one on a shared machine).
* TensorRT: the row says "not installed" where it is missing, and "not measured"
  where it is installed (an engine is built and timed on the GPU by ``quantlab build``
  / trtexec, not by this CPU-side step); neither carries a number.

Every row names its source (``label``: "onnxruntime-cpu u8s8, 2 threads") and the
file measured (its name and SHA-256), so a number can never come from the PyTorch
model. Nothing here writes files: the caller exports them (the compare job).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from quantlab.errors import QuantlabError

MEASURED = "measured"
NOT_INSTALLED = "not installed"
NOT_MEASURED = "not measured"
FAILED = "failed"
STATUSES = (MEASURED, NOT_INSTALLED, NOT_MEASURED, FAILED)
DEFAULT_THREADS = 2
DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 10


@dataclasses.dataclass
class DeploymentCost:
    """One (configuration, runtime, batch size) cost row (the run store's ``deployment`` row).

    Attributes:
        precision / calibrator / source: The configuration (as in the results rows).
        runtime: ``"onnxruntime-cpu"`` or ``"tensorrt"``.
        label: Where the timing comes from, in words ("onnxruntime-cpu u8s8, 2 threads").
        status: ``"measured"``, ``"not installed"`` (no number) or ``"failed"`` (``note`` says why).
        batch_size: Samples per timed batch (None when not measured).
        latency_ms_min / latency_ms_median: Milliseconds per batch over the timed runs.
        warmup / repeats: Untimed and timed runs.
        size_mb: The file's size in MB (10^6 bytes; weights inline).
        onnx_file / onnx_sha256: The file measured.
        note: Why not measured, or anything the reader must know.
    """

    precision: str
    calibrator: Optional[str]
    source: str
    runtime: str
    label: str
    status: str
    batch_size: Optional[int] = None
    latency_ms_min: Optional[float] = None
    latency_ms_median: Optional[float] = None
    warmup: Optional[int] = None
    repeats: Optional[int] = None
    size_mb: Optional[float] = None
    onnx_file: Optional[str] = None
    onnx_sha256: Optional[str] = None
    note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def file_sha256(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_size_mb(path: Union[str, Path]) -> float:
    """Size of a model file in MB (10^6 bytes), external weight files next to it included."""
    path = Path(path)
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return size / 1e6


def first_samples(inputs: Any, count: int) -> Any:
    """The first ``count`` samples (dim 0) of a tensor / array, tuple or dict of them."""
    if isinstance(inputs, dict):
        return {k: first_samples(v, count) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(first_samples(v, count) for v in inputs)
    if hasattr(inputs, "shape") and len(inputs.shape) > 0:
        return inputs[:count]
    return inputs


def batch_size_of(inputs: Any) -> int:
    """Samples in a batch of inputs (dim 0 of its first tensor)."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    elif isinstance(inputs, (list, tuple)):
        inputs = inputs[0]
    return int(inputs.shape[0])


def onnxruntime_label(form: Optional[str], threads: Optional[int]) -> str:
    """``"onnxruntime-cpu u8s8, 2 threads"`` (form: the INT8 form, or fp32 / fp16)."""
    return f"onnxruntime-cpu {form}, {threads if threads else 'default'} thread{'' if threads == 1 else 's'}"


def measure_onnxruntime(
    path: Union[str, Path],
    inputs: Any,
    *,
    precision: str,
    calibrator: Optional[str] = None,
    source: str = "ptq",
    batch_sizes: Sequence[int] = (1,),
    threads: Optional[int] = DEFAULT_THREADS,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
) -> List[DeploymentCost]:
    """Latency (per batch size) and size of one ONNX file in ONNX Runtime on this CPU.

    Args:
        path: The exported ``.onnx`` file.
        inputs: One batch of the model's inputs (at least ``max(batch_sizes)`` samples;
            a smaller batch is timed at its own size).
        precision / calibrator / source: The configuration the file holds.
        batch_sizes: Batch sizes to time (the first samples of ``inputs``).
        threads: ONNX Runtime intra-op threads (recorded in the label).
        warmup / repeats: Untimed runs, then timed runs, per batch size.

    Returns:
        One row per batch size; a file ONNX Runtime refuses gives one ``failed`` row with the reason.
    """
    from quantlab.runtimes.onnxruntime.runner import OnnxRuntimeRunner

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    path = Path(path)
    size, sha = file_size_mb(path), file_sha256(path)
    common = dict(precision=precision, calibrator=calibrator, source=source, runtime="onnxruntime-cpu",
                  size_mb=size, onnx_file=path.name, onnx_sha256=sha)
    form = precision
    try:
        runner = OnnxRuntimeRunner(path, threads=threads)
    except (QuantlabError, OSError) as exc:
        return [DeploymentCost(label=onnxruntime_label(form, threads), status=FAILED, note=str(exc)[:300], **common)]
    with runner:
        if precision == "int8":
            form = getattr(runner.int8_form, "form", None) or "int8"
            if not runner.qdq_fusion:
                form += " (Q/DQ in float)"
        available = batch_size_of(inputs)
        rows = []
        for wanted in dict.fromkeys(min(b, available) for b in batch_sizes):
            try:
                stats = runner.measure_latency(first_samples(inputs, wanted), warmup=warmup, iterations=repeats)
            except QuantlabError as exc:
                rows.append(DeploymentCost(label=onnxruntime_label(form, threads), status=FAILED, batch_size=wanted,
                                           note=str(exc)[:300], **common))
                continue
            rows.append(DeploymentCost(
                label=onnxruntime_label(form, threads), status=MEASURED, batch_size=stats.batch_size,
                latency_ms_min=stats.min_ms, latency_ms_median=stats.median_ms, warmup=warmup, repeats=stats.iterations, **common,
            ))
    return rows


def tensorrt_status(precision: str, calibrator: Optional[str] = None, source: str = "ptq") -> DeploymentCost:
    """TensorRT's row, without a number: "not installed" where it is missing, "not measured" where it is
    installed (an engine is built and timed on the GPU by ``quantlab build`` / trtexec, not here)."""
    from quantlab.runtimes.tensorrt.loader import tensorrt_available

    if tensorrt_available():
        return DeploymentCost(precision=precision, calibrator=calibrator, source=source, runtime="tensorrt",
                              label="tensorrt", status=NOT_MEASURED,
                              note="TensorRT is installed: build and time an engine with `quantlab build` (trtexec)")
    return DeploymentCost(precision=precision, calibrator=calibrator, source=source, runtime="tensorrt",
                          label="tensorrt", status=NOT_INSTALLED, note="TensorRT is not installed on this machine")


def cpu_threads_default() -> int:
    """The thread count used by default: 2, or fewer where the machine has fewer cores."""
    return max(1, min(DEFAULT_THREADS, os.cpu_count() or 1))


__all__ = [
    "DEFAULT_REPEATS", "DEFAULT_THREADS", "DEFAULT_WARMUP", "FAILED", "MEASURED", "NOT_INSTALLED", "NOT_MEASURED", "STATUSES",
    "DeploymentCost", "batch_size_of", "cpu_threads_default", "file_sha256", "file_size_mb", "first_samples",
    "measure_onnxruntime", "onnxruntime_label", "tensorrt_status",
]
