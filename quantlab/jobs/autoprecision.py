"""The autoprecision job: mixed INT8/FP16 for a recorded compare run, recorded as a child run.

What ``quantlab autoprecision`` does (``scales.mixed.json``, ``mixed.json`` and a
Q/DQ ONNX file in ``<run>/autoprecision.<calibrator>/``, a folder checked and
locked before any work and committed as a whole at the end), and the dashboard's
mixed precision by hand (measure a chosen set of FP16 layers, save its scales).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from quantlab._io import write_text_atomic
from quantlab.evaluation.autoprecision import auto_precision, without_layers
from quantlab.evaluation.evaluate import evaluate, evaluate_reference
from quantlab.evaluation.sensitivity import layers_in_float, rank_layers
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.folders import commit_files, lock_run_folder, open_run_folder, relative_inputs
from quantlab.jobs.recorder import Recorder
from quantlab.jobs.runs import (
    RebuiltRun,
    RunFolderError,
    autoprecision_dir,
    checkpoint_path,
    choose_variant,
    full_source,
    quantized_copy,
    read_results,
    read_run_file,
    rebuild,
    sensitivity_path,
)
from quantlab.validation import check_sensitivity

Progress = Callable[[str, int, int], None]


def export_onnx_if_available(model: Any, example_inputs: Any, path: Path) -> Optional[str]:
    """Exports the mixed-precision model as TensorRT Q/DQ ONNX through :func:`quantlab.export.export_int8`.

    Layers kept in float get no Q/DQ nodes, so a strongly typed TensorRT build runs them in FP16.

    Returns:
        None on success, else a note saying why no ONNX file was written.
    """
    try:
        from quantlab.export import export_int8
    except (ImportError, AttributeError) as exc:
        return f"quantlab.export.export_int8 is not available ({exc}); export the scales file later"
    export_int8(model, path, example_inputs)
    return None


def run_autoprecision(
    info: Dict[str, Any],
    store: Any,
    *,
    max_drop: float,
    relative: bool = False,
    calibrator: Optional[str] = None,
    order: str = "auto",
    out_dir: Optional[str] = None,
    device: Optional[str] = None,
    export_onnx: bool = True,
    progress: Optional[Progress] = None,
    start: str = "best",
) -> Dict[str, Any]:
    """Mixed precision for a compare run; writes ``scales.mixed.json``, ``mixed.json`` (and ONNX).

    Args:
        start: The INT8 row to start from: ``"best"`` (the best PTQ row; with PTQ
            algorithm rows, whichever prefix of the pipeline measured best) or a
            row's source (``"ptq"``, ``"ptq+cle"``); its checkpoint is used where
            algorithms changed the weights.
        order: ``"sensitivity"`` (a saved ``sensitivity.<calibrator>.json``),
            ``"proxy"`` (a fresh :func:`rank_layers`), ``"auto"`` (saved if present).

    Returns:
        ``{"run_id", "calibrator", "result", "order_source", "artifacts", "onnx_note"}``.
    """
    if order not in ("auto", "sensitivity", "proxy"):
        raise ValueError(f"order must be auto, sensitivity or proxy, got {order!r}")
    calibrator, source = choose_variant(info, calibrator, start)
    run_dir = Path(info["run_dir"])
    saved = sensitivity_path(run_dir, calibrator)
    if order == "sensitivity" and not saved.is_file():
        raise RunFolderError(f"{saved} not found: run `quantlab sensitivity --run {run_dir} --calibrator {calibrator}` first")
    out = Path(out_dir) if out_dir else autoprecision_dir(run_dir, calibrator, None if source == full_source(info) else source)
    # Before any work: the output folder is checked and locked (never over the run's own files);
    # it is committed as a whole at the end.
    with open_run_folder(out, kind="autoprecision", inputs=relative_inputs(run_dir)) as folder:
        model, batches, task, metric, _ = rebuild(info, device=device)
        quant = quantized_copy(model, info, calibrator, source)
        description = RunDescription(
            kind=RunKind.AUTOPRECISION, model=info["model"], data=info.get("data"), eval_data=info.get("eval_data"),
            config={"calibrator": calibrator, "source": source, "metric": metric, "max_drop": max_drop, "relative": relative,
                    "order": order},
            run_dir=str(out), parent_id=info.get("run_id"),
        )
        with Recorder(store).run(description) as run:
            fp32 = evaluate_reference(model, task, batches).metrics[metric]
            int8 = None
            for row in read_results(run_dir).get("rows", []):
                if row["precision"] == "int8" and row["calibrator"] == calibrator and row["metric"] == metric and (row.get("source") or "ptq") == source:
                    int8 = float(row["value"])  # same batches, deterministic: no need to run it again
            if saved.is_file() and order in ("auto", "sensitivity"):
                ranking = read_run_file(saved, check_sensitivity)
                layer_order = [entry["layer"] for entry in ranking["layers"]]
                order_source = f"{saved.name} (metric-ranked top candidates, then SQNR proxy)"
            else:
                layer_order = rank_layers(model, quant, task, batches, metric=metric, progress=progress).order()
                evaluate_reference(model, task, batches)  # rank_layers left a subset as the reference: restore the full one
                order_source = "fresh sensitivity ranking (SQNR proxy + metric on top candidates)"
            result = auto_precision(quant, task, batches, metric=metric, fp32_value=fp32, order=layer_order, max_drop=max_drop,
                                    relative=relative, int8_value=int8, progress=progress)
            onnx_note = None

            def write(stage: Path) -> Dict[str, Path]:
                nonlocal onnx_note
                staged: Dict[str, Path] = {}
                if result.scales is not None:
                    staged["scales"] = result.scales.save(stage / "scales.mixed.json")
                    if export_onnx:
                        from quantlab.api import load_scales

                        mixed = load_scales(quantized_copy(model, info, calibrator, source), result.scales)
                        onnx_path = stage / "model.mixed.onnx"
                        try:
                            onnx_note = export_onnx_if_available(mixed, task.inputs(batches[0]), onnx_path)
                        except Exception as exc:  # noqa: BLE001 - the scales file is the primary output; report export trouble
                            onnx_note = f"ONNX export failed: {type(exc).__name__}: {exc}"
                        if onnx_note is None:
                            staged["onnx"] = onnx_path
                checkpoint = checkpoint_path(run_dir, calibrator, source, info)
                summary = {"run_id": run.run_id, "parent_id": info.get("run_id"), "calibrator": calibrator, "start": source,
                           "checkpoint": str(checkpoint) if checkpoint.is_file() else None, "order_source": order_source,
                           "relative": relative, "requested_max_drop": max_drop, **result.to_dict(), "onnx_note": onnx_note}
                staged["summary"] = write_text_atomic(stage / "mixed.json", json.dumps(summary, indent=1, default=str))
                return staged

            artifacts = {kind: str(path) for kind, path in commit_files(folder, write, run=run).items()}
            run.results([
                {"precision": "fp32", "calibrator": None, "source": "ptq", "metric": metric, "value": fp32, "delta": 0.0, "seconds": None},
                {"precision": "int8", "calibrator": calibrator, "source": source, "metric": metric, "value": result.int8,
                 "delta": result.int8 - fp32, "seconds": None},
                {"precision": "int8", "calibrator": calibrator, "source": "mixed", "metric": metric, "value": result.value,
                 "delta": result.value - fp32, "seconds": result.seconds},
            ])
            run.layer_stats([{"calibrator": calibrator, "layer": name, "rank": i + 1} for i, name in enumerate(result.float_layers)])
            for kind, path in artifacts.items():  # recorded once committed: the files are there
                run.artifact(kind, path)
    return {"run_id": run.run_id, "calibrator": calibrator, "source": source, "result": result, "order_source": order_source,
            "artifacts": artifacts, "onnx_note": onnx_note}


# -- mixed precision by hand (the dashboard's Layers page) -------------------------------------------
def measure_mixed(rebuilt: RebuiltRun, calibrator: str, fp16_layers: Sequence[str]) -> Dict[str, Any]:
    """Measures FP32, all-INT8 and INT8 with ``fp16_layers`` in float, on the run's eval batches."""
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
    reduced = without_layers(scales, list(fp16_layers))
    if reduced.config is not None:
        exclude = tuple(dict.fromkeys(tuple(reduced.config.exclude) + tuple(fp16_layers)))
        reduced = dataclasses.replace(reduced, config=reduced.config.replace(exclude=exclude))
    return reduced


def save_mixed_scales(scales_path: str, fp16_layers: Sequence[str], out_path: "str | Path") -> Path:
    """Writes the mixed-precision scales file (atomically) and returns its path."""
    from quantlab.scales import Scales

    return mixed_scales(Scales.load(scales_path), fp16_layers).save(out_path)


def save_mixed_config(store: Any, run: Dict[str, Any], scales_path: str, calibrator: str, fp16_layers: Sequence[str]) -> Path:
    """Writes a stored run's scales without ``fp16_layers`` into its run folder; records it on the run.

    Returns:
        ``<run folder>/mixed.<calibrator>.<N>fp16.json`` (the scales file's folder when the run has none).
    """
    folder = Path(run.get("run_dir") or Path(scales_path).parent)
    out = folder / f"mixed.{calibrator}.{len(fp16_layers)}fp16.json"
    with lock_run_folder(folder, "quantlab mixed precision (dashboard)"):  # not while another job writes the folder
        path = save_mixed_scales(scales_path, list(fp16_layers), out)
    Recorder(store).attach(run["id"], "mixed_scales", path)
    return path


__all__ = ["export_onnx_if_available", "measure_mixed", "mixed_scales", "run_autoprecision", "save_mixed_config",
           "save_mixed_scales"]
