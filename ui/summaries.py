"""Plain (Streamlit-free) shaping of run-store rows into the tables the pages show.

Nothing here computes a metric: it only arranges what the run store holds
(values, deltas, per-layer numbers) and what the scales files saved
(histograms, amax). No Streamlit or Altair import: tested without a server.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pandas as pd

from quantlab.evaluation.layers import PROXY_FIELDS
from quantlab.evaluation.present import configuration_label


def series_key(precision: str, calibrator: Optional[str], source: Optional[str] = "ptq") -> str:
    """Colour key of a result row."""
    if precision in ("fp32", "fp16"):
        return precision
    if source in ("qat", "mixed", "sparse-qat"):
        return source
    if source == "sparse":
        return f"sparse {(calibrator or 'int8').lower()}"
    return (calibrator or "int8").lower()


def series_label(precision: str, calibrator: Optional[str], source: Optional[str] = "ptq") -> str:
    """Human label of a result row: ``FP32``, ``FP16``, ``INT8 entropy``, ``INT8 QAT (entropy)``, ``2:4 + INT8 entropy``
    (the CLI's label: one wording on every face)."""
    return configuration_label(precision, calibrator, source)


# Metrics where smaller is better; everything else (accuracy, cosine, agreement) is larger-is-better.
_LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "error", "mse", "latency", "seconds", "ms")
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
SOURCE_ORDER = {"ptq": 0, "mixed": 1, "qat": 2, "sparse": 3, "sparse-qat": 4}
#: Sources of 2:4 structured sparsity + INT8 rows (quantlab.sparsity).
SPARSE_SOURCES = ("sparse", "sparse-qat")
#: n, 95% interval and paired test vs FP32 of a result row (store schema 5; None for older runs).
NOISE_COLUMNS = ("n", "ci_low", "ci_high", "ci_method", "p_value", "paired_test", "within_noise")
#: The same for a layer's sensitivity (its recovery tested against all INT8).
SENSITIVITY_NOISE_COLUMNS = ("sensitivity_n", "sensitivity_p", "sensitivity_within_noise")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric, from the evaluation registry where it knows the metric."""
    if ":" not in metric:  # a module:function metric would be imported: never do that just to draw a table
        try:
            from quantlab.evaluation.tasks import task_for_metric

            task, name = task_for_metric(metric)
            return bool(task.higher_is_better(name))
        except Exception:  # noqa: BLE001 - not a registered metric: fall back to its name
            pass
    name = metric.lower()
    return not any(word in name for word in _LOWER_IS_BETTER)


def format_time(iso: Optional[str]) -> str:
    """``2026-11-25T10:46:01.123+00:00`` -> local ``2026-11-25 11:46``."""
    if not iso:
        return ""
    try:
        return _dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def primary_metric(results: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The run's headline metric: the first metric recorded for FP32 (else the first at all)."""
    for row in results:
        if row.get("precision") == "fp32":
            return row["metric"]
    return results[0]["metric"] if results else None


def results_frame(results: Sequence[Mapping[str, Any]], metric: Optional[str] = None) -> pd.DataFrame:
    """Result rows of one metric with display ``label`` and colour ``key``, FP32 first."""
    columns = ["label", "key", "precision", "calibrator", "source", "metric", "value", "delta", "seconds", *NOISE_COLUMNS]
    rows = [dict(r) for r in results if metric is None or r.get("metric") == metric]
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    for col in ("calibrator", "source", "delta", "seconds", *NOISE_COLUMNS):
        if col not in df:
            df[col] = None
    df["source"] = df["source"].fillna("ptq")
    df["label"] = [series_label(p, c, s) for p, c, s in zip(df["precision"], df["calibrator"], df["source"])]
    df["key"] = [series_key(p, c, s) for p, c, s in zip(df["precision"], df["calibrator"], df["source"])]
    if "run_id" in df and df["label"].duplicated(keep=False).any():
        # rows from several runs (QAT / mixed-precision runs shown beside a compare run)
        dup = df["label"].duplicated(keep=False) & df["run_id"].notna()
        df.loc[dup, "label"] = df.loc[dup, "label"] + " · " + df.loc[dup, "run_id"].astype(str).str[-6:]
    df["_p"] = df["precision"].map(PRECISION_ORDER).fillna(9)
    df["_s"] = df["source"].map(SOURCE_ORDER).fillna(9)
    df = df.sort_values(["_p", "_s"], kind="stable").drop(columns=["_p", "_s"])
    return df[columns].reset_index(drop=True)


def sparse_summary(results: Sequence[Mapping[str, Any]], metric: Optional[str] = None) -> pd.DataFrame:
    """The 2:4 + INT8 rows of ``metric`` with their measured GPU latency (where a ``latency_ms`` row was recorded).

    Columns: ``label``, ``value``, ``delta``, ``latency_ms``, ``fp16_latency_ms``, ``speedup_vs_fp16``
    (None where no GPU measurement was recorded: measured only on an NVIDIA GPU with cuSPARSELt).
    """
    columns = ["label", "value", "delta", "latency_ms", "fp16_latency_ms", "speedup_vs_fp16"]
    metric = metric or primary_metric(results)
    rows = [r for r in results if r.get("source") in SPARSE_SOURCES and r.get("metric") == metric]
    if not rows:
        return pd.DataFrame(columns=columns)
    latency = {(r.get("precision"), r.get("calibrator"), r.get("source")): r["value"] for r in results if r.get("metric") == "latency_ms"}
    fp16 = next((v for (p, _c, _s), v in latency.items() if p == "fp16"), None)
    out = []
    for r in rows:
        ms = latency.get((r.get("precision"), r.get("calibrator"), r.get("source")))
        out.append({"label": series_label(r["precision"], r.get("calibrator"), r.get("source")), "value": r["value"],
                    "delta": r.get("delta"), "latency_ms": ms, "fp16_latency_ms": fp16 if ms is not None else None,
                    "speedup_vs_fp16": (fp16 / ms) if (ms and fp16) else None})
    return pd.DataFrame(out, columns=columns)


def judge(df: pd.DataFrame, *, tolerance: float, higher: bool) -> pd.DataFrame:
    """Adds ``within``: whether each row's delta vs FP32 is within ``tolerance`` (FP32 rows: True)."""
    out = df.copy()

    def ok(delta: Any) -> bool:
        if delta is None or delta != delta:
            return True
        return bool(delta >= -tolerance) if higher else bool(delta <= tolerance)

    out["within"] = [ok(d) for d in out["delta"]]
    return out


def best_int8(results: Sequence[Mapping[str, Any]], metric: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The INT8 row (any source) with the best delta vs FP32 for ``metric`` (default: primary)."""
    metric = metric or primary_metric(results)
    rows = [r for r in results if r.get("precision") == "int8" and r.get("metric") == metric and r.get("delta") is not None]
    if not rows:
        return None
    higher = higher_is_better(metric)
    best = max(rows, key=lambda r: r["delta"]) if higher else min(rows, key=lambda r: r["delta"])
    return dict(best, label=series_label(best["precision"], best.get("calibrator"), best.get("source")))


def runs_frame(runs: Iterable[Mapping[str, Any]], results_by_run: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """The Runs page table: one row per run with its best INT8 delta.

    Runs come newest first, each followed by the runs started from it
    (sensitivity, export, autoprecision), whose names are marked with ``↳``.
    """
    runs = list(runs)
    ids = {r["id"] for r in runs}
    children: Dict[str, List[Mapping[str, Any]]] = {}
    for run in runs:
        if run.get("parent_id") in ids:
            children.setdefault(run["parent_id"], []).append(run)
    ordered: List[Mapping[str, Any]] = []

    def add(run: Mapping[str, Any]) -> None:
        ordered.append(run)
        for child in reversed(children.get(run["id"], [])):  # oldest child first under its parent
            add(child)

    for run in runs:
        if run.get("parent_id") not in ids:
            add(run)
    rows = []
    for run in ordered:
        results = results_by_run.get(run["id"], [])
        metric = primary_metric(results)
        best = best_int8(results, metric)
        fp32 = next((r["value"] for r in results if r["precision"] == "fp32" and r["metric"] == metric), None)
        fp16 = next((r["value"] for r in results if r["precision"] == "fp16" and r["metric"] == metric
                     and r.get("source", "ptq") == "ptq"), None)
        rows.append(
            {
                "id": run["id"],
                "name": ("↳ " if run.get("parent_id") in ids else "") + (run.get("name") or ""),
                "kind": run["kind"],
                "status": run["status"],
                "progress": float(run.get("progress") or 0.0),
                "model": run.get("model") or "",
                "model name": short_model(run.get("model")),
                "data": run.get("data") or "",
                "eval data": run.get("eval_data") or "",
                "created": format_time(run.get("created_at")),
                "metric": metric or "",
                "unit": metric_unit(metric) if metric else "",
                "FP32": fp32,
                "FP16": fp16,
                "best INT8 Δ": best["delta"] if best else None,
                "best INT8": best["label"] if best else "",
                "duration s": run_seconds(run),
                "parent": run.get("parent_id") or "",
                "error": run.get("error") or "",
            }
        )
    frame = pd.DataFrame(rows)
    if not frame.empty:
        for col in ("FP32", "FP16", "best INT8 Δ", "duration s"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")  # None -> NaN: shown as an empty cell
    return frame


def layers_frame(layer_stats: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per-layer rows as a frame (calibrator 'default' where the store has none)."""
    numbers = ["sqnr_db", "cosine", "local_sqnr_db", "local_cosine", "row_sqnr_db", "local_row_sqnr_db", "sensitivity", "rank",
               "sensitivity_n", "sensitivity_p"]
    columns = ["calibrator", "layer"] + numbers + ["sensitivity_within_noise"]
    if not layer_stats:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame([dict(r) for r in layer_stats])
    for col in columns:
        if col not in df:
            df[col] = None
    df["calibrator"] = df["calibrator"].fillna("default")
    for col in numbers:
        df[col] = pd.to_numeric(df[col], errors="coerce")  # None -> NaN: an empty cell, not "None"
    return df[columns]


def sensitivity_ranking(df: pd.DataFrame, calibrator: str) -> pd.DataFrame:
    """The calibrator's layers ordered by rank (or by sensitivity when no rank was stored)."""
    sub = df[df["calibrator"] == calibrator].copy()
    if sub.empty:
        return sub
    if sub["rank"].notna().any():
        sub = sub.sort_values("rank", na_position="last", kind="stable")
    elif sub["sensitivity"].notna().any():
        sub = sub.sort_values("sensitivity", ascending=False, na_position="last", kind="stable")
    else:  # no task-metric ranking stored: lowest proxy first (the first measured of PROXY_FIELDS)
        proxy = sub[PROXY_FIELDS[0]]
        for field in PROXY_FIELDS[1:]:
            proxy = proxy.fillna(sub[field])
        sub = sub.assign(_proxy=proxy).sort_values("_proxy", na_position="last", kind="stable").drop(columns="_proxy")
    return sub.reset_index(drop=True)


def predicted_effect(
    ranking: pd.DataFrame, fp16_layers: Sequence[str], *, int8_delta: Optional[float], higher: bool
) -> Dict[str, Any]:
    """What moving ``fp16_layers`` to FP16 should do, from the stored per-layer numbers.

    The per-layer sensitivity is each layer's own share of the INT8 loss (the
    metric change it causes); to first order the shares add up, so keeping a
    set of layers in FP16 recovers the sum of their shares, never more than the
    whole INT8 loss. Without sensitivities, the SQNR proxy gives the fraction of
    the total quantization noise (sum of 10^(-SQNR/10)) that the layers carry.

    Returns:
        ``{"predicted_delta", "recovered", "noise_share", "basis"}`` (values may be None).
    """
    chosen = ranking[ranking["layer"].isin(list(fp16_layers))]
    out: Dict[str, Any] = {"predicted_delta": None, "recovered": None, "noise_share": None, "basis": None}
    sqnr = ranking["sqnr_db"].dropna()
    if not sqnr.empty:
        noise = 10.0 ** (-ranking["sqnr_db"].astype(float) / 10.0)
        total = float(noise.sum())
        if total > 0:
            out["noise_share"] = float(noise[ranking["layer"].isin(list(fp16_layers))].sum()) / total
    if int8_delta is None:
        return out
    loss = -int8_delta if higher else int8_delta  # positive = INT8 is worse than FP32
    sens = chosen["sensitivity"].dropna().astype(float)
    if ranking["sensitivity"].notna().any():
        recovered = float(sens.clip(lower=0).sum())
        out["basis"] = "sensitivity"
    elif out["noise_share"] is not None:
        recovered = out["noise_share"] * max(loss, 0.0)
        out["basis"] = "SQNR noise share"
    else:
        return out
    recovered = min(recovered, max(loss, 0.0))
    out["recovered"] = recovered
    remaining_loss = loss - recovered
    out["predicted_delta"] = -remaining_loss if higher else remaining_loss
    return out


def histogram_frame(counts: Sequence[int], bin_width: float, *, max_bars: int = 160) -> pd.DataFrame:
    """A saved histogram merged to at most ``max_bars`` bars (for drawing), zero bins dropped.

    Bins are merged up to the last non-empty one, so the drawn range ends at the data.
    """
    last = max((i for i, c in enumerate(counts) if c), default=-1) + 1
    counts = list(counts[:last])
    if not counts:
        return pd.DataFrame(columns=["left", "right", "count"])
    group = max(1, -(-len(counts) // max_bars))
    rows = []
    for start in range(0, len(counts), group):
        total = int(sum(counts[start : start + group]))
        if total:
            rows.append({"left": start * bin_width, "right": min(start + group, len(counts)) * bin_width, "count": total})
    return pd.DataFrame(rows)


def clipped_fraction(counts: Sequence[int], bin_width: float, amax: float) -> float:
    """Fraction of the histogram's values above ``amax`` (the values a range clips)."""
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    first_clipped = int(amax / bin_width) if bin_width > 0 else len(counts)
    return float(sum(counts[first_clipped + 1 :])) / total


def merge_sensitivity(layers: pd.DataFrame, sensitivity_rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Fills ``sensitivity`` and ``rank`` of ``layers`` from a sensitivity run's rows (same calibrator/layer).

    A compare run stores SQNR/cosine per calibrator; ``quantlab sensitivity`` (or the
    dashboard job) stores the ranking in a child run. Rows of the child win.
    """
    if not sensitivity_rows:
        return layers
    extra = layers_frame(sensitivity_rows)
    key = ["calibrator", "layer"]
    carried = ["sensitivity", "rank", *SENSITIVITY_NOISE_COLUMNS]
    merged = layers.merge(extra[key + carried], on=key, how="outer", suffixes=("", "_new"))
    for col in carried:
        merged[col] = merged[f"{col}_new"].where(merged[f"{col}_new"].notna(), merged[col])
        merged = merged.drop(columns=[f"{col}_new"])
    # keep the module order of the compare run; layers only the child knows go last
    order = {name: i for i, name in enumerate(dict.fromkeys(layers["layer"]))}
    merged["_o"] = merged["layer"].map(order).fillna(len(order))
    return merged.sort_values(["_o"], kind="stable").drop(columns=["_o"]).reset_index(drop=True)


# -- units and labels ---------------------------------------------------------------------------------
#: Metrics the evaluation tasks report in percent (quantlab.evaluation.tasks); their differences are in points.
PERCENT_METRICS = frozenset({"top1", "top5", "top1_agreement", "accuracy", "agreement", "probe", "probe_accuracy",
                             "token_agreement", "next_token_accuracy"})

#: Human names of the per-layer columns (the store's names are for code).
LAYER_COLUMNS = {
    "layer": "layer",
    "layer_type": "type and shape",
    "calibrator": "calibrator",
    "sqnr_db": "SQNR in the INT8 model (dB)",
    "cosine": "cosine to FP32",
    "one_minus_cosine": "1 − cosine",
    "local_sqnr_db": "SQNR, layer alone (dB)",
    "local_cosine": "cosine, layer alone",
    "row_sqnr_db": "per-token SQNR (dB)",
    "local_row_sqnr_db": "per-token SQNR, layer alone (dB)",
    "sensitivity": "metric recovered in FP16",
    "rank": "rank",
}


def metric_unit(metric: Optional[str]) -> str:
    """``"%"`` for the percent metrics, else ``""`` (the metric's own units)."""
    return "%" if (metric or "").lower() in PERCENT_METRICS else ""


def delta_unit(metric: Optional[str]) -> str:
    """What a difference of ``metric`` is measured in: ``"points"`` for percent metrics, else ``""``."""
    return "points" if metric_unit(metric) else ""


def metric_title(metric: Optional[str]) -> str:
    """``"top1 (%)"`` / ``"perplexity"``: an axis or column title with the unit."""
    unit = metric_unit(metric)
    return f"{metric} ({unit})" if unit else str(metric or "")


def format_value(value: Optional[float], metric: Optional[str]) -> str:
    """``93.33 %`` for percent metrics, else 4 significant digits; ``–`` for no value."""
    if value is None or value != value:
        return "–"
    return f"{value:.2f} %" if metric_unit(metric) else f"{value:.4g}"


def format_delta(delta: Optional[float], metric: Optional[str]) -> str:
    """``+0.33 points`` for percent metrics, else ``+0.0123``; ``–`` for no value."""
    if delta is None or delta != delta:
        return "–"
    return f"{delta:+.2f} points" if metric_unit(metric) else f"{delta:+.3g}"


def layer_label(layer: str, info: Optional[Mapping[str, str]]) -> str:
    """``"features.0 · Conv2d 1→32 3×3"`` (the bare name where the run recorded no description)."""
    text = (info or {}).get(layer)
    return f"{layer} · {text}" if text else str(layer)


def format_clipped(count: int, total: int) -> str:
    """``"0"``, ``"12 of 1.2M (0.0010 %)"``: a count, so real clipping never rounds to 0 %."""
    if count <= 0 or total <= 0:
        return "0"
    return f"{count:,} of {_si(total)} ({100.0 * count / total:.2g} %)"


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


def clipped_count(counts: Sequence[int], bin_width: float, amax: float) -> int:
    """How many histogram values lie above ``amax`` (the numerator of :func:`clipped_fraction`)."""
    first_clipped = int(amax / bin_width) if bin_width > 0 else len(counts)
    return int(sum(counts[first_clipped + 1 :]))


def sqnr_matrix(layers: pd.DataFrame, field: str = "sqnr_db", info: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """Long-form ``layer`` x ``calibrator`` cells of ``field`` (dB) for the heatmap, module order kept.

    Columns: ``layer`` (name), ``label`` (name · type and shape), ``calibrator``, ``value``, ``order``.
    """
    columns = ["layer", "label", "calibrator", "value", "order"]
    if layers.empty or field not in layers:
        return pd.DataFrame(columns=columns)
    order = {name: i for i, name in enumerate(dict.fromkeys(layers["layer"]))}
    sub = layers.dropna(subset=[field])
    out = pd.DataFrame({
        "layer": sub["layer"].astype(str),
        "label": [layer_label(name, info) for name in sub["layer"]],
        "calibrator": sub["calibrator"].astype(str),
        "value": sub[field].astype(float),
        "order": sub["layer"].map(order),
    })
    return out.sort_values(["order", "calibrator"], kind="stable").reset_index(drop=True)[columns]


def short_model(spec: Optional[str]) -> str:
    """``quantlab.models.fmnist:pretrained_fmnist_cnn`` -> ``fmnist:pretrained_fmnist_cnn``; paths -> file name."""
    text = str(spec or "")
    module, sep, attr = text.rpartition(":")
    if not sep:
        return text.replace("\\", "/").rsplit("/", 1)[-1]
    module = module.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{module.rsplit('.', 1)[-1] if not module.endswith('.py') else module}:{attr}"


def run_seconds(run: Mapping[str, Any]) -> Optional[float]:
    """Wall time of a finished run (created -> last update), None while it runs or when unknown."""
    if run.get("status") == "running":
        return None
    try:
        start = _dt.datetime.fromisoformat(run["created_at"])
        end = _dt.datetime.fromisoformat(run["updated_at"])
    except (KeyError, TypeError, ValueError):
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None


def unrelated_reasons(a: Mapping[str, Any], b: Mapping[str, Any], *, layers_a: Optional[Mapping[str, str]] = None,
                      layers_b: Optional[Mapping[str, str]] = None) -> List[str]:
    """Why the numbers of runs ``a`` and ``b`` are not comparable ([] when they are the same model and eval data).

    Models are the same when their spec and weights match, or (different specs) when both runs recorded the
    same layer list (types and shapes).
    """
    reasons: List[str] = []
    cfg_a, cfg_b = a.get("config") or {}, b.get("config") or {}
    weights_a = cfg_a.get("weights") or (cfg_a.get("job") or {}).get("weights")
    weights_b = cfg_b.get("weights") or (cfg_b.get("job") or {}).get("weights")
    same_spec = (a.get("model") or "") == (b.get("model") or "") and weights_a == weights_b
    same_layers = bool(layers_a) and bool(layers_b) and dict(layers_a) == dict(layers_b)
    if not same_spec and not same_layers:
        reasons.append(f"different models: `{a.get('model')}` vs `{b.get('model')}`"
                       + ("" if not (layers_a and layers_b) else " with different layers"))
    if (a.get("eval_data") or "") != (b.get("eval_data") or ""):
        reasons.append(f"different eval data: `{a.get('eval_data')}` vs `{b.get('eval_data')}`")
    return reasons
