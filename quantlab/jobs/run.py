"""The run job: accuracy (and latency) of an ONNX model in ONNX Runtime, or of a TensorRT plan.

What ``quantlab run`` does. Recorded (as an ``export`` run: the measured
accuracy of an exported file) when a store is given and the data has labels.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.recorder import Recorder


@dataclasses.dataclass
class RunOutcome:
    """What :func:`run_model` measured.

    Attributes:
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        result: The runner's dataset result (samples, top-1, seconds).
        latency: Median latency of one batch (None unless asked).
        kernels: ONNX Runtime's integer kernels in the model (op type -> count).
        int8_form: The ort-cpu INT8 form the runner verified (None for other files).
        qdq_fusion: Whether ONNX Runtime fused the file's Q/DQ into integer kernels
            (False for TensorRT-form files: their Q/DQ is computed in float).
        precision: ``fp32``, ``fp16`` or ``int8`` (from the ONNX file's quantlab metadata).
        run_id: The recorded run (None when not recorded).
    """

    backend: str
    result: Any
    latency: Any = None
    kernels: Dict[str, int] = dataclasses.field(default_factory=dict)
    int8_form: Any = None
    qdq_fusion: bool = True
    precision: str = "fp32"
    run_id: Optional[str] = None


def model_precision(path: Union[str, Path]) -> str:
    """``int8`` / ``fp16`` / ``fp32`` of a quantlab ONNX file (by its metadata); ``fp32`` otherwise."""
    if not str(path).endswith(".onnx"):
        return "fp32"
    from quantlab.export.graph import load_onnx
    from quantlab.export.mapping import metadata

    fmt = metadata(load_onnx(path, check=False)).get("quantlab.format", "")
    return "int8" if fmt.startswith("qdq") else ("fp16" if fmt == "fp16" else "fp32")


def run_model(
    model: Union[str, Path],
    data: str,
    *,
    batch_size: int = 64,
    max_batches: Optional[int] = None,
    threads: Optional[int] = None,
    backend: Optional[str] = None,
    latency: bool = False,
    store: Any = None,
    progress_bar: Optional[Callable[[Optional[int], str], Any]] = None,
) -> RunOutcome:
    """Runs ``model`` over the data spec ``data``; records the top-1 (and latency) when ``store`` is given.

    Args:
        progress_bar: ``progress_bar(total, backend)``: a context manager yielding a
            ``progress(done)`` callback (the CLI's tqdm bar), or None.
    """
    import contextlib

    from quantlab.data import load_data
    from quantlab.runtimes.factory import open_runner

    loader = load_data(data, batch_size=batch_size)
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    with open_runner(model, backend=backend, threads=threads) as runner:
        bar = progress_bar(total, runner.backend) if progress_bar is not None else contextlib.nullcontext(None)
        with bar as progress:
            result = runner.run_dataset(loader, max_batches=max_batches, progress=progress)
        measured = None
        if latency:
            from quantlab.batching import split_batch

            inputs, _ = split_batch(next(iter(loader)))
            measured = runner.measure_latency(inputs)
    outcome = RunOutcome(backend=runner.backend, result=result, latency=measured)
    if runner.backend == "onnxruntime":
        from quantlab.runtimes.onnxruntime.runner import quantized_kernels

        outcome.kernels = quantized_kernels(model, threads=threads)
        outcome.int8_form, outcome.qdq_fusion = runner.int8_form, runner.qdq_fusion
    if store is None or result.top1 is None:
        return outcome
    outcome.precision = model_precision(model)
    description = RunDescription(kind=RunKind.RUN, model=str(model), eval_data=data,
                                 config={"backend": backend, "threads": threads,
                                         "ort_int8": outcome.int8_form.form if outcome.int8_form is not None else None})
    with Recorder(store).run(description) as run:
        run.results([{"precision": outcome.precision, "calibrator": None, "source": "ptq", "metric": "top1",
                      "value": result.top1, "delta": None, "seconds": result.seconds}])
        if measured is not None:
            run.results([{"precision": outcome.precision, "calibrator": None, "source": "ptq",
                          "metric": f"latency_ms_b{measured.batch_size}", "value": measured.median_ms, "delta": None,
                          "seconds": None}])
    outcome.run_id = run.run_id
    return outcome


__all__ = ["RunOutcome", "model_precision", "run_model"]
