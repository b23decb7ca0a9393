"""The deployment-cost step of the compare job: export each configuration, time the FILE in ONNX Runtime.

For FP32, FP16 (:func:`quantlab.export.float.export_float`) and INT8 per calibrator
(:func:`quantlab.export.qdq.export_int8`, ``target="ort-cpu"``: the exact integer
form ONNX Runtime computes on this CPU, chosen by
:mod:`quantlab.runtimes.onnxruntime.forms`), the model is exported into a scratch
folder and :func:`quantlab.evaluation.cost.measure_onnxruntime` times that file at
batch 1 and at the eval batch size; TensorRT gets a row without a number ("not
installed", or "not measured" where it is installed: engines are timed by ``quantlab build``). The scratch files are removed afterwards: the rows keep each file's
name, size and SHA-256 (the Export page writes the artifacts to keep).

A configuration that cannot be exported or loaded gets a ``failed`` row with the
reason: the accuracy results of the run stand regardless.
"""
from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from quantlab.errors import QuantlabError
from quantlab.evaluation.cost import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    FAILED,
    DeploymentCost,
    batch_size_of,
    cpu_threads_default,
    measure_onnxruntime,
    onnxruntime_label,
    tensorrt_status,
)


@dataclasses.dataclass(frozen=True)
class DeploymentOptions:
    """How the compare job measures deployment cost.

    Attributes:
        enabled: Measure at all (``quantlab compare --no-latency`` turns it off).
        threads: ONNX Runtime intra-op threads (default 2, or the core count if fewer).
        warmup / repeats: Untimed and timed runs per batch size.
    """

    enabled: bool = True
    threads: Optional[int] = None
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS

    def settings(self) -> dict:
        return {"deployment": {"threads": self.threads or cpu_threads_default(), "warmup": self.warmup,
                               "repeats": self.repeats} if self.enabled else None}


def _failed(precision: str, calibrator: Optional[str], threads: int, exc: BaseException) -> DeploymentCost:
    return DeploymentCost(precision=precision, calibrator=calibrator, source="ptq", runtime="onnxruntime-cpu",
                          label=onnxruntime_label(precision, threads), status=FAILED,
                          note=f"export failed: {str(exc).strip().splitlines()[0][:280] if str(exc).strip() else type(exc).__name__}")


def measure_deployment(
    model: Any,
    example_inputs: Any,
    *,
    precisions: Sequence[str],
    scales: Optional[dict] = None,
    options: DeploymentOptions = DeploymentOptions(),
    on_rows: Optional[Callable[[List[DeploymentCost]], None]] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> List[DeploymentCost]:
    """Deployment-cost rows of FP32, FP16 and INT8 (one per calibrator in ``scales``) of ``model``.

    Args:
        model: The FP32 model (not modified: INT8 is exported from a calibrated copy).
        example_inputs: One eval batch of the model's inputs (traced for the export and timed).
        precisions: Which of fp32 / fp16 / int8 the run compares.
        scales: ``{calibrator: Scales}`` for the INT8 files.
        options: Threads, warmup and repeats.
        on_rows: Called with each configuration's rows as they are measured.
        progress: ``progress("deployment", done, total)`` after each configuration.
    """
    from quantlab.api import load_scales
    from quantlab.export.float import export_float
    from quantlab.export.qdq import export_int8

    threads = options.threads or cpu_threads_default()
    batch_sizes = (1, batch_size_of(example_inputs))
    rows: List[DeploymentCost] = []
    total = 1 + ("fp16" in precisions) + (len(scales or {}) if "int8" in precisions else 0)
    done = 0

    def add(new: List[DeploymentCost]) -> None:
        rows.extend(new)
        if on_rows is not None and new:
            on_rows(list(new))

    def measure(precision: str, calibrator: Optional[str], export: Callable[[Path], Any], folder: Path) -> None:
        nonlocal done
        path = folder / f"{precision}{'.' + calibrator if calibrator else ''}.onnx"
        try:
            export(path)
        except (QuantlabError, RuntimeError, ValueError) as exc:
            add([_failed(precision, calibrator, threads, exc)])
        else:
            measured = measure_onnxruntime(path, example_inputs, precision=precision, calibrator=calibrator,
                                           batch_sizes=batch_sizes, threads=threads, warmup=options.warmup, repeats=options.repeats)
            add(measured + [tensorrt_status(precision, calibrator)])
        done += 1
        if progress is not None:
            progress("deployment", done, total)

    with tempfile.TemporaryDirectory(prefix="quantlab_deploy_") as tmp:
        folder = Path(tmp)
        measure("fp32", None, lambda p: export_float(model, p, example_inputs, sidecar=False), folder)
        if "fp16" in precisions:
            measure("fp16", None, lambda p: export_float(model, p, example_inputs, precision="fp16", sidecar=False), folder)
        if "int8" in precisions:
            for name, calibrated in (scales or {}).items():
                quant = copy.deepcopy(model)
                load_scales(quant, calibrated)
                measure("int8", name, lambda p, q=quant: export_int8(q, p, example_inputs, target="ort-cpu", sidecar=False), folder)
                del quant
    return rows


__all__ = ["DeploymentOptions", "measure_deployment"]
