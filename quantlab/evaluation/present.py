"""What the CLI and the dashboard show of a compare run: the stored rows arranged, with units.

Pure arrangement of run-store rows (dicts as :class:`quantlab.store.RunStore`
returns them, or ``row.to_dict()`` of a fresh result): nothing is computed here
that the store does not hold, so what is shown equals what is stored. Both
faces use these functions, so the CLI table and the Compare page agree.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

#: Metrics in percent (their differences are in percentage points).
PERCENT_METRICS = frozenset({"top1", "top5", "top1_agreement", "accuracy", "probe_accuracy", "token_agreement",
                             "next_token_accuracy"})
#: The agreement-with-FP32 metric of each task's primary metric.
AGREEMENT_METRICS = ("top1_agreement", "token_agreement")
PYTORCH_SECONDS = "PyTorch eval s (fake-quant, not deployment)"
_PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
_SOURCE_ORDER = {"ptq": 0, "mixed": 1, "qat": 2, "sparse": 3, "sparse-qat": 4}


def metric_unit(metric: str) -> str:
    """``"%"`` for percent metrics, ``""`` for the others (cosine, perplexity, user metrics)."""
    return "%" if metric in PERCENT_METRICS else ""


def delta_unit(metric: str) -> str:
    """``"points"`` (percentage points) for percent metrics, else ``"units"`` of the metric."""
    return "points" if metric in PERCENT_METRICS else "units"


def with_unit(name: str, unit: str) -> str:
    return f"{name} ({unit})" if unit else name


def configuration_label(precision: str, calibrator: Optional[str], source: Optional[str] = "ptq") -> str:
    """``FP32``, ``FP16``, ``INT8 entropy``, ``INT8 QAT (entropy)``, ``2:4 + INT8 entropy``, ..."""
    if precision in ("fp32", "fp16"):
        return precision.upper()
    if source == "qat":
        return f"INT8 QAT ({calibrator})" if calibrator else "INT8 QAT"
    if source == "mixed":
        return f"Mixed {precision.upper()}/FP16 ({calibrator})" if calibrator else "Mixed precision"
    if source == "sparse":
        return f"2:4 + {precision.upper()} {calibrator}" if calibrator else f"2:4 + {precision.upper()}"
    if source == "sparse-qat":
        return f"2:4 + {precision.upper()} QAT ({calibrator})" if calibrator else f"2:4 + {precision.upper()} QAT"
    label = f"{precision.upper()} {calibrator}" if calibrator else precision.upper()
    if source and source.startswith("ptq+"):  # a prefix of the PTQ algorithms (compare --algorithms)
        return f"{label} ({source})"
    return label


def _key(row: Mapping[str, Any]) -> Tuple[str, Optional[str], str]:
    return row.get("precision"), row.get("calibrator"), row.get("source") or "ptq"


def _order(keys: Iterable[Tuple[str, Optional[str], str]]) -> List[Tuple[str, Optional[str], str]]:
    keys = list(dict.fromkeys(keys))
    return sorted(keys, key=lambda k: (_PRECISION_ORDER.get(k[0], 9), _SOURCE_ORDER.get(k[2], 9), keys.index(k)))


def format_p(p: Optional[float]) -> str:
    """A p-value for a table: ``0.25``, ``0.0031``, ``<1e-6``; ``-`` when there is none."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    if p < 1e-6:
        return "<1e-6"
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def noise_verdict(row: Mapping[str, Any]) -> str:
    """``reference`` (FP32), ``within noise`` / ``outside noise`` (the paired test at 5%), or ``not tested``."""
    if row.get("precision") == "fp32" and (row.get("source") or "ptq") == "ptq":
        return "reference"
    within = row.get("within_noise")
    if within is None:
        return "not tested"
    return "within noise" if within else "outside noise"


def accuracy_rows(results: Sequence[Mapping[str, Any]], metric: str) -> List[Dict[str, Any]]:
    """One row per configuration of ``metric``: value, n, 95% interval, Δ vs FP32, the paired test,
    the verdict, agreement with FP32 and the PyTorch eval seconds (as stored)."""
    by_key: Dict[Tuple, Dict[str, Mapping[str, Any]]] = {}
    for row in results:
        by_key.setdefault(_key(row), {})[row.get("metric")] = row
    out = []
    for key in _order(k for k, metrics in by_key.items() if metric in metrics):
        row = by_key[key][metric]
        agreement = next((by_key[key][m] for m in AGREEMENT_METRICS if m in by_key[key]), None)
        out.append({
            "configuration": configuration_label(*key), "precision": key[0], "calibrator": key[1], "source": key[2],
            "value": row.get("value"), "n": row.get("n"), "ci_low": row.get("ci_low"), "ci_high": row.get("ci_high"),
            "ci_method": row.get("ci_method"), "delta": row.get("delta"), "p_value": row.get("p_value"),
            "paired_test": row.get("paired_test"), "within_noise": row.get("within_noise"), "noise": noise_verdict(row),
            "agreement": agreement.get("value") if agreement is not None else None,
            "agreement_metric": agreement.get("metric") if agreement is not None else None,
            "seconds": row.get("seconds"),
        })
    return out


def methods(rows: Sequence[Mapping[str, Any]]) -> Dict[str, List[str]]:
    """The interval and paired-test methods the rows used (for a caption)."""
    return {"interval": sorted({r["ci_method"] for r in rows if r.get("ci_method")}),
            "paired test": sorted({r["paired_test"] for r in rows if r.get("paired_test")})}


def fidelity_rows(fidelity: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The stored fidelity rows with their configuration label, FP16 first then INT8 per calibrator."""
    by_key = {_key(r): r for r in fidelity}
    return [{"configuration": configuration_label(*k), **by_key[k]} for k in _order(by_key)]


def deployment_rows(deployment: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration: size (MB), ONNX Runtime latency (median and min ms per batch) at
    each batch size measured, the timing's source label, and TensorRT's status.

    Returns:
        Dicts with ``configuration``, ``size_mb``, ``source_label``, ``batch_sizes`` (sorted),
        ``median_ms`` / ``min_ms`` (``{batch size: ms}``), ``repeats``, ``warmup``, ``tensorrt``
        (``"not installed"``, ``"measured"``, ``"failed"`` or ``"-"``), ``onnx_sha256`` and ``note``.
    """
    grouped: Dict[Tuple, Dict[str, Any]] = {}
    for row in deployment:
        key = _key(row)
        entry = grouped.setdefault(key, {
            "configuration": configuration_label(*key), "precision": key[0], "calibrator": key[1], "source": key[2],
            "size_mb": None, "source_label": None, "median_ms": {}, "min_ms": {}, "repeats": None, "warmup": None,
            "tensorrt": "-", "onnx_sha256": None, "note": None,
        })
        if row.get("runtime") == "tensorrt":
            entry["tensorrt"] = row.get("status")
            continue
        entry["source_label"] = row.get("label")
        entry["size_mb"] = row.get("size_mb") if row.get("size_mb") is not None else entry["size_mb"]
        entry["onnx_sha256"] = row.get("onnx_sha256") or entry["onnx_sha256"]
        if row.get("status") == "measured":
            entry["median_ms"][row["batch_size"]] = row.get("latency_ms_median")
            entry["min_ms"][row["batch_size"]] = row.get("latency_ms_min")
            entry["repeats"], entry["warmup"] = row.get("repeats"), row.get("warmup")
        elif row.get("note"):
            entry["note"] = f"{row.get('status')}: {row['note']}"
    out = []
    for key in _order(grouped):
        entry = grouped[key]
        entry["batch_sizes"] = sorted(entry["median_ms"])
        out.append(entry)
    return out


def batch_sizes(rows: Sequence[Mapping[str, Any]]) -> List[int]:
    """Every batch size measured in :func:`deployment_rows` output."""
    return sorted({b for r in rows for b in r["batch_sizes"]})


__all__ = [
    "AGREEMENT_METRICS", "PERCENT_METRICS", "PYTORCH_SECONDS", "accuracy_rows", "batch_sizes", "configuration_label",
    "delta_unit", "deployment_rows", "fidelity_rows", "format_p", "methods", "metric_unit", "noise_verdict", "with_unit",
]
