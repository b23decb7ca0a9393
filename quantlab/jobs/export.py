"""The export jobs: ONNX files (INT8 Q/DQ, FP16, FP32) with their check report, recorded as ``export`` runs.

* :func:`run_export`: what ``quantlab export`` does (a model spec and a scales file
  to one ONNX file; recorded when a store is given).
* :func:`export_artifacts`: the demo job's export stage and the dashboard's
  "Export now": the Q/DQ ONNX of one calibrator's scales, its ``check`` report and
  a legacy calibration cache, as a child run of the compare run.
* :func:`build_engine`: a TensorRT engine from a run's ONNX file, recorded on the run.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from quantlab._io import write_text_atomic
from quantlab.errors import QuantlabError
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.progress import Progress, no_progress
from quantlab.jobs.recorder import Recorder

# The legacy cache is for TensorRT <= 10 (11 removed implicit INT8); its header names the exact version.
CACHE_TRT_VERSION = "10.16.0"


# -- example inputs -----------------------------------------------------------------------------------
def first_inputs(data: Any) -> Any:
    """The model inputs of the first batch of ``data`` (for tracing the export)."""
    from quantlab.batching import split_batch

    for batch in data:
        return split_batch(batch)[0]
    raise QuantlabError("the data is empty: no batch to trace the export with")


def example_inputs(data: Optional[str] = None, input_shape: Optional[str] = None) -> Any:
    """The example batch for tracing: from a data spec or a random tensor of ``input_shape`` ("1,28,28").

    Raises:
        ValueError: neither is given, or the shape is not positive integers.
    """
    import torch

    if data:
        from quantlab.batching import split_batch
        from quantlab.data import load_data

        batch = next(iter(load_data(data, batch_size=2)))
        inputs, _ = split_batch(batch)
        if isinstance(inputs, dict):  # keyword inputs: labels are for the loss, not the graph
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        return inputs
    if input_shape:
        try:
            shape = tuple(int(d) for d in re.split(r"[x,]", input_shape.strip()))
        except ValueError:
            raise ValueError(f"--input-shape {input_shape!r} must be comma-separated integers, e.g. 1,28,28") from None
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"--input-shape {input_shape!r} must hold positive integers")
        generator = torch.Generator().manual_seed(0)
        return torch.randn((2,) + shape, generator=generator)
    raise ValueError("give --input-shape (e.g. 1,28,28) or --data (e.g. fmnist:calib) so the model can be traced")


# -- export and check ---------------------------------------------------------------------------------
def export_qdq(quant_model: Any, path: Union[str, Path], example: Any, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Q/DQ ONNX (TensorRT form) of a calibrated model; returns the file."""
    from quantlab.export.qdq import export_int8

    return Path(export_int8(quant_model, path, example, metadata=metadata).path)


# -- where an artifact came from ----------------------------------------------------------------------
def provenance(precision: str, scales: Any = None, *, source_run: Optional[str] = None,
               algorithms: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """ONNX metadata entries naming what an exported file came from.

    ``quantlab.precision``; for INT8, ``quantlab.calibrator`` (who chose the activation
    ranges), ``quantlab.calibrator_params``, ``quantlab.algorithms`` (PTQ algorithms of the
    config, JSON list) and ``quantlab.float_layers`` (layers kept in float: mixed precision);
    ``quantlab.source_run`` (the compare run the model and scales come from);
    ``quantlab.algorithm_reports`` (JSON: what each PTQ algorithm did, from ``algorithms``,
    the record of a checkpoint or scales file).
    """
    entries = {"quantlab.precision": precision}
    if source_run:
        entries["quantlab.source_run"] = str(source_run)
    if scales is not None:
        entries["quantlab.calibrator"] = str(scales.calibrator)
        entries["quantlab.calibrator_params"] = json.dumps(scales.calibrator_params, sort_keys=True, default=str)
        entries["quantlab.algorithms"] = json.dumps(list(scales.config.algorithms) if scales.config is not None else [])
        entries["quantlab.float_layers"] = json.dumps(list(scales.float_layers))
    entries.update(algorithms_metadata(algorithms) or {})
    return entries


def artifact_provenance(path: Union[str, Path]) -> Dict[str, Any]:
    """What a file of a run says about its origin: ``precision``, ``calibrator``, ``algorithms``, ``float_layers``.

    Read from the file itself: an ONNX model's metadata (:func:`provenance`), a scales
    file's calibrator and config, a calibration cache's ``<cache>.json``. ``{}`` for other
    files or files that do not say (an ONNX file of another tool, an older export).
    """
    path = Path(path)
    try:
        if path.suffix == ".onnx":
            return _onnx_provenance(path)
        if path.suffix == ".json" and b'"format": "quantlab.scales"' in path.open("rb").read(4096):
            from quantlab.scales import Scales

            scales = Scales.load(path)
            return {"precision": "int8" if not scales.float_layers else "int8+fp16", "calibrator": scales.calibrator,
                    "algorithms": list(scales.config.algorithms) if scales.config is not None else [],
                    "float_layers": list(scales.float_layers)}
        sidecar = Path(f"{path}.json")
        if sidecar.is_file() and path.open("rb").read(4) == b"TRT-":
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            origin = data.get("scales_from") or {}
            return {"precision": "int8", "calibrator": str(origin.get("calibrator") or ""),
                    "algorithms": [str(a) for a in origin.get("algorithms") or []],
                    "float_layers": [str(a) for a in origin.get("float_layers") or []],
                    "header": str(data.get("header") or ""), "note": str(data.get("note") or "")}
    except (OSError, ValueError, QuantlabError, AttributeError, TypeError):
        return {}
    return {}


def _onnx_provenance(path: Path) -> Dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    out: Dict[str, Any] = {}
    fmt = meta.get("quantlab.format")
    precision = meta.get("quantlab.precision") or {"qdq-int8": "int8"}.get(fmt or "", fmt or "")
    if precision:
        out["precision"] = precision
    if "quantlab.calibrator" in meta:
        out["calibrator"] = meta["quantlab.calibrator"]
    for key in ("algorithms", "float_layers"):
        try:
            value = json.loads(meta.get(f"quantlab.{key}") or "[]")
        except ValueError:
            value = []
        out[key] = [str(v) for v in value] if isinstance(value, list) else []
    if out.get("float_layers"):
        out["precision"] = "int8+fp16"
    return out


def provenance_text(info: Dict[str, Any]) -> str:
    """``"INT8 · calibrator mse · algorithms: smoothquant"`` (``"-"`` when nothing is known)."""
    parts = []
    precision = info.get("precision")
    if precision:
        parts.append({"int8+fp16": "INT8 + FP16 (mixed)"}.get(precision, precision.upper()))
    if info.get("calibrator"):
        parts.append(f"calibrator {info['calibrator']}")
    if precision and precision.startswith("int8"):
        parts.append("algorithms: " + (", ".join(info.get("algorithms") or []) or "none"))
    if info.get("float_layers"):
        parts.append(f"{len(info['float_layers'])} layer(s) in float")
    return " · ".join(parts) or "-"


def zip_files(paths: List[Union[str, Path]], root: Optional[Union[str, Path]] = None) -> bytes:
    """An in-memory zip of ``paths`` ("Download all"); names relative to ``root`` when inside it, else the file name.

    Missing or unreadable files are left out; two files of the same name get distinct names.
    """
    import io
    import zipfile

    buffer = io.BytesIO()
    base = Path(root).resolve() if root else None
    used: Dict[str, int] = {}
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for given in dict.fromkeys(str(p) for p in paths):
            path = Path(given)
            try:
                payload = path.read_bytes()
            except OSError:
                continue
            try:
                name = path.resolve().relative_to(base).as_posix() if base else path.name
            except ValueError:
                name = path.name
            if name in used:
                used[name] += 1
                stem, dot, suffix = name.partition(".")
                name = f"{stem}-{used[name]}{dot}{suffix}"
            used.setdefault(name, 0)
            archive.writestr(name, payload)
    return buffer.getvalue()


def check_onnx(path: str) -> Dict[str, Any]:
    """``quantlab check`` of an ONNX file as a dict (findings, counts, ok)."""
    from quantlab.export.check import check_model

    report = check_model(path)
    data = report.to_dict()
    data["num_errors"] = len(report.errors)
    data["num_warnings"] = len(report.warnings)
    return data


def onnx_sparsity(path: str) -> Dict[str, Any]:
    """How many weighted layers of an ONNX file are eligible for 2:4 sparse kernels and hold the pattern."""
    from quantlab.sparsity.check import check_onnx_sparsity

    report = check_onnx_sparsity(path)
    return {"layers": len(report.layers), "eligible": sum(layer.eligible for layer in report.layers),
            "compliant": len(report.compliant)}


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


def write_calibration_cache(fp32_model: Any, scales: Any, example: Any, out_dir: Union[str, Path],
                            *, trt_version: str = CACHE_TRT_VERSION) -> Path:
    """Legacy TensorRT calibration cache for ``scales``, keyed by the FP32 ONNX graph's tensor names.

    Exports the FP32 ONNX graph (``model.fp32.onnx``) the cache refers to, then writes
    ``calibration.cache`` for TensorRT ``trt_version`` (the header must match the reader exactly).
    """
    from quantlab.export.cache import write_calibration_cache as write_cache
    from quantlab.export.float import export_float

    out = Path(out_dir)
    fp32_onnx = export_float(fp32_model, out / "model.fp32.onnx", example, precision="fp32", metadata=provenance("fp32")).path
    path, _cache = write_cache(scales, fp32_onnx, out / "calibration.cache", trt_version=trt_version)
    return Path(path)


# -- quantlab export ----------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportOutcome:
    """What :func:`run_export` produced.

    Attributes:
        result: The :class:`quantlab.export.result.ExportResult`.
        check: The ``check`` report of an INT8 TensorRT export (None when not checked).
        status: 0, or 1 when the check found errors (or a 2:4 export lost the pattern).
        run_id: The recorded run (None when not recorded).
        sparsity: With ``sparsity="2:4"``: the :class:`quantlab.sparsity.check.ExportSparsity`
            (the file's per-layer 2:4 verdicts and the layers that lost the pattern).
    """

    result: Any
    check: Any = None
    status: int = 0
    run_id: Optional[str] = None
    sparsity: Any = None


def run_export(
    model_spec: str,
    out: Union[str, Path],
    *,
    precision: str = "int8",
    scales: Optional[str] = None,
    weights: Optional[str] = None,
    device: Optional[str] = None,
    data: Optional[str] = None,
    input_shape: Optional[str] = None,
    target: str = "tensorrt",
    ort_other_convs: str = "im2col",
    ort_int8: str = "auto",
    ort_reduce_range: bool = False,
    exporter: str = "torchscript",
    opset: int = 17,
    io_dtype: str = "fp32",
    dynamic_batch: bool = True,
    placement: bool = True,
    check: bool = True,
    store: Any = None,
    sparsity: Optional[str] = None,
    checkpoint: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> ExportOutcome:
    """Exports ``model_spec`` (INT8 from ``scales``, or FP16/FP32) to ``out``; checks an INT8 TensorRT export.

    With ``checkpoint`` (a ``model.<calibrator>.safetensors`` of a run whose PTQ
    algorithms changed the weights) the quantized model is rebuilt from it
    (:func:`quantlab.checkpoint.load_checkpoint`: the transforms' structure, the
    weights, the scales beside it unless ``scales`` names others); scales whose
    weights changed are refused without it. The algorithms and their reports go
    into the ONNX file's metadata (``quantlab.algorithms``).

    ``out`` (and its ``.json`` sidecar) are checked before any work: never one of
    the inputs, a folder, or an existing file of another kind; a second export to
    the same ``out`` is refused while this one runs (a lock beside the file).
    Recorded as an ``export`` run when ``store`` is given (any exit, Ctrl-C and
    SIGTERM included, records its outcome); a check with errors records the run
    failed (and returns status 1) without raising.
    With ``sparsity="2:4"`` (a 2:4-pruned model, e.g. ``--weights`` from ``quantlab qat
    --sparsity 2:4``) every layer that holds the pattern in PyTorch must hold it in
    the exported weights too (else status 1 and the run failed, the same way).
    ``progress(stage, done, total)`` hears each stage (loading, exporting, checking).

    Raises:
        ValueError: contradictory options (before the model is loaded).
        OutputPathError / RunLockedError: ``out`` cannot be written (before the model is loaded).
        ScalesFormatError: a bad scales file (before the model is loaded).
    """
    from quantlab.model_source import is_torchscript_spec, load_model
    from quantlab.outputs import EXPORT_SIDECAR, ONNX_FILE, check_output_file, spec_path
    from quantlab.scales import Scales
    from quantlab.jobs.folders import lock_run_folder

    if sparsity not in (None, "2:4"):
        raise ValueError(f"sparsity {sparsity!r}: only 2:4 is supported")
    if precision == "int8" and not scales and not checkpoint:
        raise ValueError("--precision int8 needs --scales (a scales file from `quantlab calibrate`) or --checkpoint")
    if checkpoint and precision != "int8":
        raise ValueError("--checkpoint holds an INT8 model: use --precision int8")
    if precision != "int8" and target != "tensorrt":
        raise ValueError("--target applies to --precision int8 only")
    if target != "ort-cpu" and (ort_int8 != "auto" or ort_reduce_range):
        raise ValueError("--ort-int8 / --ort-reduce-range apply to --target ort-cpu only")
    # Before any work: never over an input (--scales, --model, ...), a folder, or a file that is not an ONNX model.
    sources = {"--model": spec_path(model_spec), "--weights": weights, "--scales": scales, "--data": spec_path(data),
               "--checkpoint": checkpoint}
    out = check_output_file(out, label="--out", inputs=sources, replace=ONNX_FILE)
    check_output_file(f"{out}.json", label="--out's sidecar", inputs=sources, replace=EXPORT_SIDECAR)
    step = progress or no_progress
    with lock_run_folder(out, "quantlab export"):  # a second export to the same --out is refused, not interleaved
        step("loading model and example inputs", 0, 0)
        loaded = Scales.load(scales) if precision == "int8" and scales else None  # a bad file fails before the model loads
        algorithms = _algorithms_record(loaded, checkpoint)
        # The model first: an example module may register the data specs it brings (fortunes:...).
        # (A TorchScript file needs the example batch to be converted: then it comes first.)
        early = example_inputs(data, input_shape) if is_torchscript_spec(model_spec) else None
        model = load_model(model_spec, weights=weights, device=device, example_inputs=early)
        inputs = early if early is not None else example_inputs(data, input_shape)
        return _export(model, out, inputs, loaded, model_spec=model_spec, precision=precision, scales=scales, data=data,
                       checkpoint=checkpoint, algorithms=algorithms,
                       target=target, ort_other_convs=ort_other_convs, ort_int8=ort_int8,
                       ort_reduce_range=ort_reduce_range, exporter=exporter, opset=opset, io_dtype=io_dtype,
                       dynamic_batch=dynamic_batch, placement=placement, check=check, store=store, sparsity=sparsity,
                       step=step)


def _algorithms_record(scales: Any, checkpoint: Optional[str]) -> Optional[Dict[str, Any]]:
    """What the PTQ algorithms did, from the checkpoint (checked here, before the model loads) or the scales.

    Raises:
        CheckpointFormatError: a bad checkpoint.
        ValueError: scales whose weights algorithms changed, without their checkpoint.
    """
    if checkpoint:
        from quantlab.checkpoint import read_checkpoint

        info, _ = read_checkpoint(checkpoint, tensors=False)
        return {"transforms": info.transforms, "refinements": info.refinements, "calibrator": info.calibrator,
                "source": info.source}
    if scales is not None and scales.changed_weights():
        names = [r.get("name") for r in scales.algorithms.get("transforms", []) + scales.algorithms.get("refinements", [])]
        raise ValueError(f"these scales fit weights changed by {', '.join(map(str, names))}: pass the run's checkpoint "
                         "(--checkpoint model.<calibrator>.safetensors, beside the scales file)")
    return None


def _export(model: Any, out: Path, inputs: Any, loaded: Any, *, model_spec: str, precision: str, scales: Optional[str],
            data: Optional[str], target: str, checkpoint: Optional[str] = None, algorithms: Optional[Dict[str, Any]] = None,
            ort_other_convs: str, ort_int8: str, ort_reduce_range: bool, exporter: str,
            opset: int, io_dtype: str, dynamic_batch: bool, placement: bool, check: bool, store: Any,
            sparsity: Optional[str], step: Progress) -> ExportOutcome:
    """:func:`run_export`'s recorded part, once ``out`` is checked and locked and the model loaded."""
    common = dict(exporter=exporter, opset=opset, dynamic_batch=dynamic_batch)
    config = {"precision": precision, "target": target if precision == "int8" else None,
              "scales": scales, "exporter": exporter, "opset": opset, "out": str(out)}
    if checkpoint:
        config["checkpoint"] = checkpoint
    if algorithms:
        config["algorithms"] = [r["name"] for r in algorithms["transforms"] + algorithms["refinements"]]
        config["algorithm_reports"] = algorithms
    if sparsity:
        config["sparsity"] = sparsity
    if precision == "int8" and target == "ort-cpu":
        from quantlab.runtimes.onnxruntime.forms import resolve_form

        # The same (memoized) choice export_int8 makes next, so the run records which kernels the file uses.
        choice = resolve_form(ort_int8, reduce_range=ort_reduce_range)
        config.update(ort_int8=choice.form, ort_int8_requested=ort_int8, ort_weight_bits=choice.weight_bits)
    description = RunDescription(kind=RunKind.EXPORT, model=model_spec, data=data, run_dir=str(out.parent), config=config)
    with Recorder(store).run(description) as run:
        if precision == "int8":
            import quantlab as ql
            from quantlab.export.qdq import export_int8

            if checkpoint:
                from quantlab.checkpoint import load_checkpoint

                load_checkpoint(model, checkpoint, scales=loaded)  # strict: names every missing or extra tensor/layer
            else:
                ql.load_scales(model, loaded)  # strict: names every missing or extra layer
            step(f"exporting INT8 Q/DQ ONNX ({target})", 0, 0)
            result = export_int8(model, out, inputs, target=target, placement=placement,
                                 ort_other_convs=ort_other_convs, ort_int8=ort_int8, ort_reduce_range=ort_reduce_range,
                                 metadata=provenance("int8", loaded, algorithms=algorithms), **common)
        else:
            from quantlab.export.float import export_float

            step(f"exporting {precision.upper()} ONNX", 0, 0)
            result = export_float(model, out, inputs, precision=precision, io_dtype=io_dtype,
                                  metadata=provenance(precision), **common)
        outcome = ExportOutcome(result=result, run_id=run.run_id)
        if result.precision == "int8" and result.target == "tensorrt" and check:
            from quantlab.export.check import check_model

            step("checking the Q/DQ placement (quantlab check)", 0, 0)
            outcome.check = check_model(result.path)
        failures = []
        if outcome.check is not None and outcome.check.errors:
            failures.append(f"quantlab check found {len(outcome.check.errors)} error(s) in {result.path}")
        if sparsity:
            from quantlab.sparsity.check import check_export_sparsity

            step("checking the 2:4 pattern of the exported weights", 0, 0)
            outcome.sparsity = check_export_sparsity(model, result.path)
            if outcome.sparsity.problem:
                failures.append(outcome.sparsity.problem)
        outcome.status = 1 if failures else 0
        run.artifact("onnx", result.path)
        if result.sidecar:
            run.artifact("report", result.sidecar)
        if failures:
            run.fail("; ".join(failures))
    return outcome


def algorithms_metadata(algorithms: Optional[Dict[str, Any]]) -> Optional[Dict[str, str]]:
    """ONNX ``metadata_props`` entries recording the PTQ algorithms (None without any)."""
    if not algorithms or not (algorithms.get("transforms") or algorithms.get("refinements")):
        return None
    names = [str(r.get("name")) for r in list(algorithms.get("transforms") or []) + list(algorithms.get("refinements") or [])]
    return {"quantlab.algorithms": json.dumps(names), "quantlab.algorithm_reports": json.dumps(algorithms, sort_keys=True, default=str)}


# -- the demo job's export stage and "Export now" -----------------------------------------------------
def _quantized_copy(model: Any, scales: Any) -> Any:
    from quantlab.api import load_scales

    quant = copy.deepcopy(model)
    load_scales(quant, scales)  # attaches quantizers with the scales' config, then loads every range
    return quant


def export_artifacts(
    store: Any,
    parent_id: Optional[str],
    *,
    model: Any,
    scales: Any,
    calibrator: str,
    example: Any,
    out_dir: Path,
    describe: Dict[str, Any],
    progress: Optional[Callable[[float, str], None]] = None,
    quantized: Any = None,
) -> Dict[str, Any]:
    """Q/DQ ONNX of ``model`` with ``scales``, its check report and a calibration cache: a child ``export`` run.

    Args:
        store: The run store (a :class:`Recorder` is accepted too; None records nothing).
        parent_id: The compare run the scales come from.
        model: The FP32 model (not modified).
        scales: The calibrator's :class:`quantlab.Scales`.
        calibrator: Its name (for names and the record).
        example: A batch of model inputs to trace the export with.
        out_dir: Where the files go (``model.int8.onnx``, ``check.json``/``.md``,
            ``model.fp32.onnx``, ``calibration.cache``).
        describe: ``model``, ``data``, ``eval_data`` specs for the record.
        progress: ``progress(fraction, what)``.
        quantized: The quantized model to export, when ``scales`` alone do not make it
            (a checkpoint's: PTQ algorithms changed the weights; no calibration cache then).

    Returns:
        ``{"run_id", "outputs": {what: path}, "skipped": [why]}``; the calibration
        cache is a legacy artifact, so its failure is noted rather than raised.
    """
    step = progress or (lambda fraction, what: None)
    out = Path(out_dir)
    recorder = store if isinstance(store, Recorder) else Recorder(store)
    description = RunDescription(
        kind=RunKind.EXPORT, model=describe.get("model") or "model", data=describe.get("data"),
        eval_data=describe.get("eval_data"), run_dir=str(out), parent_id=parent_id, name=f"export · {calibrator}",
        config={"calibrator": calibrator, "precision": "int8", "target": "tensorrt",
                "algorithms": list(scales.config.algorithms) if scales.config is not None else [],
                "float_layers": list(scales.float_layers)},
    )
    outputs: Dict[str, str] = {}
    skipped: List[str] = []
    with recorder.run(description) as child:
        quant = quantized if quantized is not None else _quantized_copy(model, scales)
        step(0.1, "Q/DQ ONNX")
        algorithms = scales.algorithms if getattr(scales, "algorithms", None) else None
        onnx_path = export_qdq(quant, out / "model.int8.onnx", example,
                               provenance("int8", scales, source_run=parent_id, algorithms=algorithms))
        child.artifact("onnx", onnx_path)
        outputs["onnx"] = str(onnx_path)
        step(0.5, "check")
        report = check_onnx(str(onnx_path))
        check_json = write_text_atomic(out / "check.json", json.dumps(report, indent=1))
        check_md = write_text_atomic(out / "check.md", check_markdown(report))
        child.artifact("check", check_json)
        child.artifact("check_report", check_md)
        outputs["check"] = str(check_md)
        step(0.7, "calibration cache")
        try:
            if algorithms:
                raise QuantlabError("not written: PTQ algorithms changed the weights, and a calibration cache holds "
                                    "scales only (use the Q/DQ ONNX)")
            cache = write_calibration_cache(model, scales, example, out)
            child.artifact("onnx_fp32", out / "model.fp32.onnx")
            child.artifact("calibration_cache", cache)
            outputs["calibration_cache"] = str(cache)
        except (QuantlabError, ValueError) as exc:  # a legacy artifact: note why, keep the main results
            skipped.append(f"calibration cache: {exc}")
    return {"run_id": child.run_id, "outputs": outputs, "skipped": skipped}


def calibrator_export_dir(run_dir: Union[str, Path], calibrator: str) -> Path:
    """``<run folder>/export.<calibrator>``: where the Export page puts one calibrator's artifacts
    (the demo's best calibrator stays in the run folder itself)."""
    return Path(run_dir) / ("export." + re.sub(r"[^A-Za-z0-9_.-]+", "_", calibrator).strip("._"))


def export_recorded_run(store: Any, run: Dict[str, Any], calibrator: str, *,
                        out_dir: Optional[Union[str, Path]] = None,
                        scales_file: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Exports a stored compare run (rebuilt from its run folder) for ``calibrator`` (any of the run's).

    What the Export page's "Export INT8" button does: the Q/DQ ONNX of that
    calibrator's scales (its metadata names the calibrator and algorithms), its check
    report and a calibration cache, in ``out_dir`` (default
    :func:`calibrator_export_dir`), as a child ``export`` run. ``scales_file`` exports
    another scales file of the run instead (a saved mixed-precision configuration:
    its float layers get no Q/DQ, so TensorRT runs them in FP16); ``calibrator`` then names it.
    """
    from quantlab.jobs.runs import load_run_info, quantized_copy, rebuild, scales_path
    from quantlab.scales import Scales

    from quantlab.jobs.folders import lock_run_folder

    info = load_run_info(run.get("run_dir") or run["id"], store.path)
    with lock_run_folder(info["run_dir"], "quantlab export (dashboard)"):  # not while another job writes the folder
        model, batches, task, _metric, _calib = rebuild(info)
        scales = Scales.load(scales_file or scales_path(info["run_dir"], calibrator))
        out = Path(out_dir) if out_dir is not None else calibrator_export_dir(info["run_dir"], calibrator)
        out.mkdir(parents=True, exist_ok=True)
        return export_artifacts(
            store, run["id"], model=model, scales=scales, calibrator=calibrator,
            # From the run's checkpoint where algorithms changed the weights (a saved mixed configuration: its own scales).
            quantized=quantized_copy(model, info, calibrator) if scales_file is None else None,
            example=task.inputs(batches[0]), out_dir=out,
            describe={"model": info.get("model"), "data": info.get("data"), "eval_data": info.get("eval_data")},
        )


def export_float_recorded(store: Any, run: Dict[str, Any], precision: str = "fp16") -> Dict[str, Any]:
    """The FP16 (or FP32) ONNX of a stored run's model, rebuilt from its run folder: a child ``export`` run.

    Writes ``<run folder>/model.<precision>.onnx`` (graph inputs and outputs stay FP32
    for FP16: a drop-in replacement) and records it as artifact ``onnx_<precision>``.

    Returns:
        ``{"run_id", "outputs": {"onnx_<precision>": path}, "skipped": []}``.
    """
    from quantlab.export.float import export_float
    from quantlab.jobs.folders import lock_run_folder
    from quantlab.jobs.runs import load_run_info, rebuild

    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision {precision!r}: give fp16 or fp32")
    info = load_run_info(run.get("run_dir") or run["id"], store.path)
    recorder = store if isinstance(store, Recorder) else Recorder(store)
    description = RunDescription(
        kind=RunKind.EXPORT, model=info.get("model") or "model", data=info.get("data"), eval_data=info.get("eval_data"),
        run_dir=str(info["run_dir"]), parent_id=run["id"], name=f"export · {precision}",
        config={"precision": precision, "calibrator": None, "target": None},
    )
    with lock_run_folder(info["run_dir"], "quantlab export (dashboard)"):
        model, batches, task, _metric, _calib = rebuild(info)
        with recorder.run(description) as child:
            result = export_float(model, Path(info["run_dir"]) / f"model.{precision}.onnx", task.inputs(batches[0]),
                                  precision=precision, metadata=provenance(precision, source_run=run["id"]))
            child.artifact(f"onnx_{precision}", result.path)
    return {"run_id": child.run_id, "outputs": {f"onnx_{precision}": str(result.path)}, "skipped": []}


# -- TensorRT ----------------------------------------------------------------------------------------
def build_engine(store: Any, run_id: Optional[str], onnx_path: str, plan_path: str) -> Path:
    """Builds a strongly typed TensorRT engine from a run's ONNX file and records it on the run.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed (needs an NVIDIA GPU).
    """
    from quantlab.runtimes.tensorrt.loader import build_engine as build

    result = build(onnx_path, plan_path)
    plan = Path(getattr(result, "plan", result))
    Recorder(store).attach(run_id, "engine", plan)
    return plan


__all__ = ["CACHE_TRT_VERSION", "ExportOutcome", "artifact_provenance", "build_engine", "calibrator_export_dir", "check_markdown",
           "check_onnx", "example_inputs", "export_artifacts", "export_float_recorded", "export_qdq", "export_recorded_run",
           "first_inputs", "onnx_sparsity", "provenance", "provenance_text", "run_export", "write_calibration_cache", "zip_files"]
