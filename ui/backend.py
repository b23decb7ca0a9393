"""The quantlab functions the dashboard calls for export, check, TensorRT and mixed precision.

One adapter module, so pages and jobs do not care which module of
:mod:`quantlab.export`, :mod:`quantlab.runtimes.tensorrt` or :mod:`quantlab.evaluation`
holds a function. Nothing here computes a metric, a scale or a graph: each
function forwards to the function that does. A function that this quantlab
does not have (an optional dependency, or a part not yet installed) raises
:class:`FeatureUnavailable` naming it, and the page says so instead of failing.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from quantlab.errors import QuantlabError

TENSORRT_INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt"
# The legacy cache is for TensorRT <= 10 (11 removed implicit INT8); its header names the exact version.
CACHE_TRT_VERSION = "10.16.0"


class FeatureUnavailable(QuantlabError):
    """This quantlab lacks a function the dashboard wanted (the message names it)."""


def _find(what: str, candidates: Sequence[Tuple[str, str]]) -> Callable[..., Any]:
    """The first ``module.attribute`` of ``candidates`` that imports."""
    for module_name, attr in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        fn = getattr(module, attr, None)
        if fn is not None:
            return fn
    names = ", ".join(f"{m}.{a}" for m, a in candidates)
    raise FeatureUnavailable(f"{what} is not available in this quantlab (looked for {names})")


# -- inputs -------------------------------------------------------------------------------------------
def example_inputs(data: Any) -> Any:
    """The model inputs of the first batch of ``data`` (for tracing the export)."""
    from quantlab.batching import split_batch

    for batch in data:
        return split_batch(batch)[0]
    raise QuantlabError("the data is empty: no batch to trace the export with")


# -- export and check ---------------------------------------------------------------------------------
def export_qdq(quant_model: Any, path: "str | Path", example: Any) -> Path:
    """Q/DQ ONNX (TensorRT form) of a calibrated model; returns the file."""
    export_int8 = _find("Q/DQ ONNX export", [("quantlab.export.qdq", "export_int8"), ("quantlab.export", "export_int8")])
    return Path(export_int8(quant_model, path, example).path)


def check_onnx(path: str) -> Dict[str, Any]:
    """``quantlab check`` of an ONNX file as a dict (findings, counts, ok)."""
    check_model = _find("the Q/DQ placement check", [("quantlab.export.check", "check_model"), ("quantlab.export", "check_model")])
    report = check_model(path)
    data = report.to_dict()
    data["num_errors"] = len(report.errors)
    data["num_warnings"] = len(report.warnings)
    return data


def check_markdown(report: Dict[str, Any]) -> str:
    """The check report as Markdown (the artifact users download)."""
    lines = [
        f"# Q/DQ placement check: {Path(str(report.get('source', ''))).name}",
        "",
        f"- result: {'OK (no errors)' if report.get('ok') else 'ERRORS'}",
        f"- opset {report.get('opset')}, {report.get('num_nodes')} nodes, {report.get('num_qdq')} Q/DQ nodes",
        f"- weighted ops quantized: {report.get('num_weighted_quantized')} of {report.get('num_weighted')}",
        f"- {report.get('num_errors', 0)} error(s), {report.get('num_warnings', 0)} warning(s)",
        "",
    ]
    findings = report.get("findings") or []
    if findings:
        lines += ["| severity | rule | node | op | message |", "|---|---|---|---|---|"]
        for f in findings:
            message = str(f.get("message", "")).replace("|", "\\|")
            lines.append(f"| {f.get('severity')} | {f.get('rule')} | {f.get('node')} | {f.get('op_type')} | {message} |")
    else:
        lines.append("No findings: every rule passed.")
    return "\n".join(lines) + "\n"


def write_calibration_cache(fp32_model: Any, scales: Any, example: Any, out_dir: "str | Path",
                            *, trt_version: str = CACHE_TRT_VERSION) -> Path:
    """Legacy TensorRT calibration cache for ``scales``, keyed by the FP32 ONNX graph's tensor names.

    Exports the FP32 ONNX graph (``model.fp32.onnx``) the cache refers to, then writes
    ``calibration.cache`` for TensorRT ``trt_version`` (the header must match the reader exactly).
    """
    export_float = _find("FP32 ONNX export", [("quantlab.export.float", "export_float")])
    writer = _find("the TensorRT calibration cache writer", [("quantlab.export.cache", "write_calibration_cache")])
    out = Path(out_dir)
    fp32_onnx = export_float(fp32_model, out / "model.fp32.onnx", example, precision="fp32").path
    path, _cache = writer(scales, fp32_onnx, out / "calibration.cache", trt_version=trt_version)
    return Path(path)


def write_report(run_dir: "str | Path") -> Path:
    """The run's self-contained HTML report (what ``quantlab report`` writes)."""
    writer = _find("the run report", [("quantlab.evaluation.report", "write_report")])
    return Path(writer(run_dir, Path(run_dir) / "report.html", fmt="html"))


# -- TensorRT -----------------------------------------------------------------------------------------
def tensorrt_info() -> Dict[str, Any]:
    """Whether ``tensorrt`` imports here, its version, the install command and why not."""
    info: Dict[str, Any] = {"available": False, "version": None, "install": TENSORRT_INSTALL, "reason": None}
    try:
        import_tensorrt = _find("the TensorRT engine builder", [("quantlab.runtimes.tensorrt.loader", "import_tensorrt")])
        trt = import_tensorrt()
        info.update(available=True, version=getattr(trt, "__version__", None))
    except QuantlabError as exc:  # TensorRTUnavailableError (with the install hint) or FeatureUnavailable
        info["reason"] = str(exc)
    return info


def trtexec_command(onnx_path: str, plan_path: str) -> str:
    """The trtexec command line that builds the same engine (from :mod:`quantlab.runtimes.tensorrt`)."""
    command = _find("the trtexec command line", [("quantlab.runtimes.tensorrt.loader", "trtexec_command")])(onnx_path, plan_path)
    if isinstance(command, str):
        return command
    return _find("trtexec formatting", [("quantlab.runtimes.tensorrt.loader", "format_command")])(command)


def build_engine(onnx_path: str, plan_path: str) -> Path:
    """Builds a strongly typed TensorRT engine from the ONNX file (needs TensorRT and a GPU)."""
    result = _find("the TensorRT engine build", [("quantlab.runtimes.tensorrt.loader", "build_engine")])(onnx_path, plan_path)
    return Path(getattr(result, "plan", result))


# -- mixed precision ----------------------------------------------------------------------------------
@dataclasses.dataclass
class RebuiltRun:
    """A compare run's model, eval batches and task, rebuilt from its run folder."""

    info: Dict[str, Any]
    model: Any
    batches: List[Any]
    task: Any
    metric: str


def rebuild_run(run: Dict[str, Any], store_path: Optional[str] = None) -> RebuiltRun:
    """Rebuilds the FP32 model, eval batches and task of a compare run (same specs, same batches)."""
    from quantlab.evaluation.runs import load_run_info, rebuild

    ref = run.get("run_dir") or run["id"]
    info = load_run_info(ref, store_path)
    model, batches, task, metric, _ = rebuild(info)
    return RebuiltRun(info=info, model=model, batches=batches, task=task, metric=metric)


def measure_mixed(rebuilt: RebuiltRun, calibrator: str, fp16_layers: Sequence[str]) -> Dict[str, Any]:
    """Measures FP32, all-INT8 and INT8 with ``fp16_layers`` in float, on the run's eval batches."""
    import time

    from quantlab.evaluation.evaluate import evaluate, evaluate_reference
    from quantlab.evaluation.runs import quantized_copy
    from quantlab.evaluation.sensitivity import layers_in_float

    start = time.perf_counter()
    task, metric = rebuilt.task, rebuilt.metric
    fp32 = evaluate_reference(rebuilt.model, task, rebuilt.batches).metrics[metric]
    quant = quantized_copy(rebuilt.model, rebuilt.info, calibrator)
    int8 = evaluate(quant, task, rebuilt.batches).metrics[metric]
    with layers_in_float(quant, list(fp16_layers)):
        mixed = evaluate(quant, task, rebuilt.batches).metrics[metric]
    return {
        "metric": metric, "calibrator": calibrator, "fp32": fp32, "int8": int8, "mixed": mixed, "delta": mixed - fp32,
        "int8_delta": int8 - fp32, "layers": list(fp16_layers), "batches": len(rebuilt.batches),
        "seconds": time.perf_counter() - start,
    }


def mixed_scales(scales: Any, fp16_layers: Sequence[str]) -> Any:
    """``scales`` without ``fp16_layers`` (they run in FP16), with the config excluding them too.

    The config's exclude list lets :func:`quantlab.load_scales` attach quantizers to
    exactly the remaining layers, so the file loads strictly.
    """
    from quantlab.evaluation.autoprecision import without_layers

    reduced = without_layers(scales, list(fp16_layers))
    if reduced.config is not None:
        exclude = tuple(dict.fromkeys(tuple(reduced.config.exclude) + tuple(fp16_layers)))
        reduced = dataclasses.replace(reduced, config=reduced.config.replace(exclude=exclude))
    return reduced


def save_mixed_scales(scales_path: str, fp16_layers: Sequence[str], out_path: "str | Path") -> Path:
    """Writes the mixed-precision scales file (atomically) and returns its path."""
    from quantlab.scales import Scales

    return mixed_scales(Scales.load(scales_path), fp16_layers).save(out_path)
