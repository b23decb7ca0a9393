"""Sensitivity and autoprecision on a recorded compare run, recorded in the run store.

These are what ``quantlab sensitivity`` and ``quantlab autoprecision`` do; a
Python user with a run folder gets the same results and files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from quantlab._io import write_text_atomic
from quantlab.evaluation.autoprecision import auto_precision
from quantlab.evaluation.evaluate import evaluate_reference
from quantlab.evaluation.runs import (
    RunFolderError,
    autoprecision_dir,
    calibrator_of,
    quantized_copy,
    read_results,
    read_run_file,
    rebuild,
    sensitivity_path,
)
from quantlab.validation import check_sensitivity
from quantlab.evaluation.sensitivity import full_ranking, proxy_agreement, rank_layers

Progress = Callable[[str, int, int], None]


def _recorded(store: Any, run_id: str, work: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    try:
        out = work()
    except BaseException as exc:
        from quantlab.interrupts import outcome_message, outcome_status

        store.set_status(run_id, outcome_status(exc), error=outcome_message(exc))
        raise
    store.set_status(run_id, "done")
    return out


def run_sensitivity(
    info: Dict[str, Any],
    store: Any,
    *,
    calibrator: Optional[str] = None,
    top_k: Optional[int] = None,
    budget_passes: float = 3.0,
    subset_fraction: float = 0.25,
    full: bool = False,
    full_layers: Optional[int] = None,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> Dict[str, Any]:
    """Ranks the layers of a compare run; writes ``sensitivity.<calibrator>.json``.

    With ``full``, also evaluates every layer (or ``full_layers`` of them, evenly
    spaced along the proxy order so that both ends are represented) on the same
    subset and measures how well the SQNR proxies (local and end-to-end) agree
    with that ranking.

    Returns:
        ``{"run_id", "calibrator", "result", "agreement", "path"}``.
    """
    model, batches, task, metric, _ = rebuild(info, device=device)
    calibrator = calibrator_of(info, calibrator)
    quant = quantized_copy(model, info, calibrator)
    run_dir = Path(info["run_dir"])
    run_id = store.create_run(
        "sensitivity", model=info["model"], data=info.get("data"), eval_data=info.get("eval_data"),
        config={"calibrator": calibrator, "metric": metric, "method": "everything_but_one", "top_k": top_k,
                "budget_passes": budget_passes, "subset_fraction": subset_fraction, "full": full, "full_layers": full_layers},
        run_dir=run_dir, parent_id=info.get("run_id"),
    )

    def work() -> Dict[str, Any]:
        result = rank_layers(model, quant, task, batches, metric=metric, top_k=top_k, budget_passes=budget_passes,
                             subset_fraction=subset_fraction, progress=progress)
        agreement = None
        full_scores = None
        if full:
            by_proxy = [e.layer for e in sorted(result.layers, key=lambda e: e.proxy_sqnr_db if e.proxy_sqnr_db is not None else float("inf"))]
            if full_layers is not None and 2 <= full_layers < len(by_proxy):
                step = (len(by_proxy) - 1) / (full_layers - 1)
                by_proxy = [by_proxy[round(i * step)] for i in range(full_layers)]
            full_scores = full_ranking(quant, task, batches[: result.subset_batches], metric=metric, layers=by_proxy, progress=progress)
            agreement = {
                "local_row_sqnr (the proxy)": proxy_agreement(result.layer_errors, full_scores, key="local_row_sqnr_db"),
                "local_sqnr": proxy_agreement(result.layer_errors, full_scores, key="local_sqnr_db"),
                "end_to_end_sqnr": proxy_agreement(result.layer_errors, full_scores, key="sqnr_db"),
            }
        store.add_layer_stats(run_id, result.to_rows(calibrator))
        summary = {
            "run_id": run_id, "parent_id": info.get("run_id"), "calibrator": calibrator, "metric": metric,
            "method": result.method, "fp32": result.fp32, "int8": result.baseline,
            "subset_batches": result.subset_batches, "total_batches": result.total_batches,
            "cost_passes": result.cost_passes, "seconds": result.seconds,
            "layers": [vars(entry) for entry in result.layers],
            "agreement": agreement, "full_ranking": full_scores,
        }
        path = write_text_atomic(sensitivity_path(run_dir, calibrator), json.dumps(summary, indent=1, default=str))
        store.add_artifact(run_id, "sensitivity", path)
        return {"run_id": run_id, "calibrator": calibrator, "result": result, "agreement": agreement, "path": path}

    return _recorded(store, run_id, work)


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
) -> Dict[str, Any]:
    """Mixed precision for a compare run; writes ``scales.mixed.json``, ``mixed.json`` (and ONNX).

    Args:
        order: ``"sensitivity"`` (a saved ``sensitivity.<calibrator>.json``),
            ``"proxy"`` (a fresh :func:`rank_layers`), ``"auto"`` (saved if present).

    Returns:
        ``{"run_id", "calibrator", "result", "order_source", "artifacts", "onnx_note"}``.
    """
    if order not in ("auto", "sensitivity", "proxy"):
        raise ValueError(f"order must be auto, sensitivity or proxy, got {order!r}")
    from quantlab.store.runfolder import RunFolder

    calibrator = calibrator_of(info, calibrator)
    run_dir = Path(info["run_dir"])
    saved = sensitivity_path(run_dir, calibrator)
    if order == "sensitivity" and not saved.is_file():
        raise RunFolderError(f"{saved} not found: run `quantlab sensitivity --run {run_dir} --calibrator {calibrator}` first")
    out = Path(out_dir) if out_dir else autoprecision_dir(run_dir, calibrator)
    # Before any work: the output folder is checked and locked; it is committed as a whole at the end.
    folder = RunFolder(out, kind="autoprecision", purpose="quantlab autoprecision",
                       inputs={f"the run's {p.name}": p for p in run_dir.glob("*.json")})
    try:
        return _autoprecision(
            info=info, store=store, max_drop=max_drop, relative=relative, calibrator=calibrator, order=order,
            device=device, export_onnx=export_onnx, progress=progress, run_dir=run_dir, saved=saved, out=out,
            folder=folder,
        )
    finally:
        folder.close()


def _autoprecision(*, info, store, max_drop, relative, calibrator, order, device, export_onnx, progress,
                   run_dir, saved, out, folder) -> Dict[str, Any]:
    model, batches, task, metric, _ = rebuild(info, device=device)
    quant = quantized_copy(model, info, calibrator)
    folder.store = str(getattr(store, "path", "")) or None
    run_id = store.create_run(
        "autoprecision", model=info["model"], data=info.get("data"), eval_data=info.get("eval_data"),
        config={"calibrator": calibrator, "metric": metric, "max_drop": max_drop, "relative": relative, "order": order},
        run_dir=out, parent_id=info.get("run_id"),
    )

    def work() -> Dict[str, Any]:
        fp32 = evaluate_reference(model, task, batches).metrics[metric]
        int8 = None
        for row in read_results(run_dir).get("rows", []):
            if row["precision"] == "int8" and row["calibrator"] == calibrator and row["metric"] == metric and row.get("source", "ptq") == "ptq":
                int8 = float(row["value"])  # same batches, deterministic: no need to run it again
        if saved.is_file() and order in ("auto", "sensitivity"):
            ranking = read_run_file(saved, check_sensitivity)
            layer_order = [entry["layer"] for entry in ranking["layers"]]
            source = f"{saved.name} (metric-ranked top candidates, then SQNR proxy)"
        else:
            layer_order = rank_layers(model, quant, task, batches, metric=metric, progress=progress).order()
            evaluate_reference(model, task, batches)  # rank_layers left a subset as the reference: restore the full one
            source = "fresh sensitivity ranking (SQNR proxy + metric on top candidates)"
        result = auto_precision(quant, task, batches, metric=metric, fp32_value=fp32, order=layer_order, max_drop=max_drop,
                                relative=relative, int8_value=int8, progress=progress)
        artifacts: Dict[str, str] = {}
        onnx_note = None
        folder.run_id = run_id
        stage = folder.stage()
        if result.scales is not None:
            artifacts["scales"] = str(folder.final(result.scales.save(stage / "scales.mixed.json")))
            if export_onnx:
                from quantlab.api import load_scales

                mixed = load_scales(quantized_copy(model, info, calibrator), result.scales)
                onnx_path = stage / "model.mixed.onnx"
                try:
                    onnx_note = export_onnx_if_available(mixed, task.inputs(batches[0]), onnx_path)
                except Exception as exc:  # noqa: BLE001 - the scales file is the primary output; report export trouble
                    onnx_note = f"ONNX export failed: {type(exc).__name__}: {exc}"
                if onnx_note is None:
                    artifacts["onnx"] = str(folder.final(onnx_path))
        summary = {"run_id": run_id, "parent_id": info.get("run_id"), "calibrator": calibrator, "order_source": source,
                   "relative": relative, "requested_max_drop": max_drop, **result.to_dict(), "onnx_note": onnx_note}
        artifacts["summary"] = str(folder.final(write_text_atomic(stage / "mixed.json", json.dumps(summary, indent=1, default=str))))
        folder.commit()
        store.add_results(run_id, [
            {"precision": "fp32", "calibrator": None, "source": "ptq", "metric": metric, "value": fp32, "delta": 0.0, "seconds": None},
            {"precision": "int8", "calibrator": calibrator, "source": "ptq", "metric": metric, "value": result.int8,
             "delta": result.int8 - fp32, "seconds": None},
            {"precision": "int8", "calibrator": calibrator, "source": "mixed", "metric": metric, "value": result.value,
             "delta": result.value - fp32, "seconds": result.seconds},
        ])
        store.add_layer_stats(run_id, [{"calibrator": calibrator, "layer": name, "rank": i + 1} for i, name in enumerate(result.float_layers)])
        for kind, path in artifacts.items():
            store.add_artifact(run_id, kind, path)
        return {"run_id": run_id, "calibrator": calibrator, "result": result, "order_source": source,
                "artifacts": artifacts, "onnx_note": onnx_note}

    return _recorded(store, run_id, work)
