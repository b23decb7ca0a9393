"""The sensitivity job: rank a recorded compare run's layers, recorded as a child run.

What ``quantlab sensitivity`` does; a Python user with a run folder gets the
same results and files (``sensitivity.<calibrator>.json`` in the run folder,
written atomically while the job holds the folder's lock: not while another
command writes the folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from quantlab._io import write_text_atomic
from quantlab.evaluation.sensitivity import SensitivityResult, full_ranking, proxy_agreement, rank_layers
from quantlab.jobs.description import RunDescription, RunKind
from quantlab.jobs.folders import lock_run_folder
from quantlab.jobs.recorder import Recorder
from quantlab.jobs.runs import calibrator_of, quantized_copy, rebuild, sensitivity_path

Progress = Callable[[str, int, int], None]


def summary(run_id: Optional[str], parent_id: Optional[str], calibrator: str, result: SensitivityResult,
            agreement: Optional[Dict[str, Any]] = None, full_scores: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The content of ``sensitivity.<calibrator>.json`` (the same file for the CLI and the demo job)."""
    return {
        "run_id": run_id, "parent_id": parent_id, "calibrator": calibrator, "metric": result.metric,
        "method": result.method, "fp32": result.fp32, "int8": result.baseline,
        "subset_batches": result.subset_batches, "total_batches": result.total_batches,
        "cost_passes": result.cost_passes, "seconds": result.seconds,
        "layers": [vars(entry) for entry in result.layers],
        "agreement": agreement, "full_ranking": full_scores,
    }


def write_summary(path: Path, content: Dict[str, Any]) -> Path:
    """Writes a sensitivity summary atomically."""
    return write_text_atomic(path, json.dumps(content, indent=1, default=str))


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
    run_dir = Path(info["run_dir"])
    # Before any work: sensitivity.<calibrator>.json goes into the run folder, not while another command writes it.
    with lock_run_folder(run_dir, "quantlab sensitivity"):
        model, batches, task, metric, _ = rebuild(info, device=device)
        calibrator = calibrator_of(info, calibrator)
        quant = quantized_copy(model, info, calibrator)
        description = RunDescription(
            kind=RunKind.SENSITIVITY, model=info["model"], data=info.get("data"), eval_data=info.get("eval_data"),
            config={"calibrator": calibrator, "metric": metric, "method": "everything_but_one", "top_k": top_k,
                    "budget_passes": budget_passes, "subset_fraction": subset_fraction, "full": full, "full_layers": full_layers},
            run_dir=str(run_dir), parent_id=info.get("run_id"),
        )
        with Recorder(store).run(description) as run:
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
            run.layer_stats(result.to_rows(calibrator))
            content = summary(run.run_id, info.get("run_id"), calibrator, result, agreement, full_scores)
            path = write_summary(sensitivity_path(run_dir, calibrator), content)
            run.artifact("sensitivity", path)
    return {"run_id": run.run_id, "calibrator": calibrator, "result": result, "agreement": agreement, "path": path}
