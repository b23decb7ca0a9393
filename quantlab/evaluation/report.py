"""Rendering the report of a compare run (HTML with inline SVG, or Markdown + SVG images).

Contents: the results table (every precision/calibrator, delta vs FP32, time),
a chart of the primary metric, the per-layer SQNR bar chart, the sensitivity
ranking and mixed-precision outcome when those commands were run, and the
activation histograms of the lowest-SQNR layers with every calibrator's amax
marked (the statistics come from the scales files).

Pure functions of the data the report job (:mod:`quantlab.jobs.report`) reads
from the run folder: nothing here reads or writes a file.
"""
from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from quantlab.evaluation import svg
from quantlab.evaluation.layers import PROXY_FIELDS

MAX_HISTOGRAMS = 8
MAX_SQNR_LAYERS = 80


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _num(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        return float(value)  # results.json writes inf as "inf"
    except (TypeError, ValueError):
        return None


def _proxy(entry: Dict[str, Any]) -> float:
    """A stored layer row's proxy SQNR (the first measured of PROXY_FIELDS); inf if none."""
    for key in PROXY_FIELDS:
        value = _num(entry.get(key))
        if value is not None:
            return value
    return math.inf


def _delta(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else ("0" if v == 0 else f"{v:+.3g}")


def _result_table(results: Dict[str, Any]) -> Tuple[List[str], List[List[str]]]:
    rows = results.get("rows", [])
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    metrics.sort(key=lambda m: m != results.get("metric"))
    grouped: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    for r in rows:
        key = (r["precision"], r.get("calibrator") or "-", r.get("source") or "ptq")
        grouped.setdefault(key, {"seconds": r.get("seconds")})[r["metric"]] = r
    headers = ["precision", "calibrator"] + [h for m in metrics for h in (m, f"Δ {m}")] + ["PyTorch eval s (fake-quant, not deployment)"]
    table = []
    for (precision, calibrator, source), cells in grouped.items():
        line = [precision + ("" if source == "ptq" else f" ({source})"), calibrator]
        for m in metrics:
            r = cells.get(m)
            line += [_fmt(_num(r["value"])) if r else "-", _delta(r.get("delta")) if r else "-"]
        seconds = _num(cells["seconds"])
        table.append(line + ["-" if seconds is None else f"{seconds:.2f}"])
    return headers, table


def _charts(data: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """``(slug, caption, svg)`` for every chart."""
    results = data["results"]
    metric = results.get("metric")
    charts = []
    primary = [r for r in results.get("rows", []) if r["metric"] == metric]
    fp32 = next((_num(r["value"]) for r in primary if r["precision"] == "fp32"), None)
    if primary:
        labels = [r["precision"] + (f" {r['calibrator']}" if r.get("calibrator") else "") + ("" if (r.get("source") or "ptq") == "ptq" else f" ({r['source']})")
                  for r in primary]
        charts.append(("metric", f"{metric} per precision and calibrator",
                       svg.bar_chart(labels, [(metric, [_num(r["value"]) for r in primary])], title=f"{metric} per precision / calibrator",
                                     reference=fp32, reference_label="FP32", bar_height=16, zoom=True)))
    layers = results.get("layers") or {}
    best = results.get("best_calibrator") or next(iter(layers), None)
    if best in layers and layers[best]:
        entries = layers[best]
        if len(entries) > MAX_SQNR_LAYERS:  # keep the chart readable: the worst layers by the proxy
            entries = sorted(entries, key=_proxy)[:MAX_SQNR_LAYERS]
        names = [e["layer"] for e in entries]
        series = [("end to end", [_num(e.get("sqnr_db")) for e in entries]),
                  ("layer alone", [_num(e.get("local_sqnr_db")) for e in entries])]
        if any(e.get("local_row_sqnr_db") is not None for e in entries):
            series.append(("layer alone, per token/sample", [_num(e.get("local_row_sqnr_db")) for e in entries]))
        charts.append(("sqnr", f"per-layer output SQNR, {best} (higher is better)" + (f"; the {MAX_SQNR_LAYERS} lowest" if len(entries) < len(layers[best]) else ""),
                       svg.bar_chart(names, series, title=f"per-layer SQNR (dB), calibrator {best}", unit="dB")))
    scales = data["scales"]
    if scales:
        any_scales = next(iter(scales.values()))
        # The layers some calibrator handles worst come first (lowest local SQNR over all calibrators).
        worst: Dict[str, float] = {}
        for entries in layers.values():
            for e in entries:
                worst[e["layer"]] = min(worst.get(e["layer"], math.inf), _proxy(e))
        order = sorted(worst, key=worst.get)
        order += [m for m in any_scales.statistics if m not in order]
        for layer in [m for m in order if m in any_scales.statistics][:MAX_HISTOGRAMS]:
            stats = any_scales.statistics[layer]
            markers = []
            for name, s in scales.items():
                try:
                    markers.append((name, float(s.get(layer, "input").amax)))
                except KeyError:
                    continue
            counts = stats.counts.tolist()
            while counts and counts[-1] == 0:
                counts.pop()
            charts.append((f"hist-{layer}", f"input |x| histogram of {layer} with each calibrator's amax",
                           svg.histogram(counts, stats.bin_width, markers, title=f"{layer} input |x| (max {stats.amax:.4g})")))
    return charts


def _sections(data: Dict[str, Any]) -> List[Tuple[str, List[str], List[List[str]], str]]:
    """Extra tables: ``(heading, headers, rows, note)``."""
    from quantlab.evaluation import present

    out = []
    results = data.get("results") or {}
    fidelity = [r for r in results.get("fidelity") or [] if isinstance(r, dict)]
    if fidelity:
        rows = [[r["configuration"], _fmt(r.get("n")), _fmt(_num(r.get("top1_agreement"))), _fmt(_num(r.get("max_abs_error"))),
                 _fmt(_num(r.get("max_rel_error"))), _fmt(_num(r.get("one_minus_cosine"))), _fmt(_num(r.get("kl_divergence")))]
                for r in present.fidelity_rows(fidelity)]
        out.append(("Output fidelity vs FP32", ["configuration", "n", "top-1 agreement (%)", "max abs error", "max rel error",
                                                 "1 − cos", "KL (nats)"], rows,
                    "The model's main output on the same eval samples compared with FP32's (Polygraphy-style)."))
    deployment = [r for r in results.get("deployment") or [] if isinstance(r, dict)]
    if deployment:
        shown = present.deployment_rows(deployment)
        sizes = present.batch_sizes(shown)
        rows = [[r["configuration"], _fmt(_num(r["size_mb"]))]
                + [f"{_fmt(_num(r['median_ms'].get(b)))} / {_fmt(_num(r['min_ms'].get(b)))}" if b in r["median_ms"] else "-" for b in sizes]
                + [r["source_label"] or "-", r["tensorrt"]] for r in shown]
        repeats = next((r["repeats"] for r in shown if r["repeats"]), None)
        out.append(("Deployment cost (exported ONNX files)", ["configuration", "size (MB)"]
                    + [f"batch {b} median / min (ms)" for b in sizes] + ["timing source", "TensorRT"], rows,
                    f"Each configuration exported to ONNX and timed in the runtime named ({repeats} timed runs per batch size "
                    "after warmup); not PyTorch fake-quant time."))
    for calibrator, s in data["sensitivity"].items():
        rows = [[str(e["rank"]), e["layer"], _fmt(_num(e.get("proxy_sqnr_db"))), _fmt(_num(e.get("value"))), _fmt(_num(e.get("sensitivity")))]
                for e in s.get("layers", [])[:20]]
        note = (f"method: quantize everything but one layer; FP32 {_fmt(_num(s.get('fp32')))}, all INT8 {_fmt(_num(s.get('int8')))} "
                f"on {s.get('subset_batches')}/{s.get('total_batches')} eval batches; cost {_fmt(_num(s.get('cost_passes')))} eval passes.")
        for name, a in (s.get("agreement") or {}).items():
            note += f" Proxy {name} vs full ranking: Spearman {_fmt(_num(a.get('spearman')))}, Kendall {_fmt(_num(a.get('kendall')))}."
        out.append((f"Sensitivity ranking ({calibrator})", ["rank", "layer", "proxy SQNR dB", f"{s.get('metric')} with layer in FP16", "recovered"], rows, note))
    for calibrator, m in data["mixed"].items():
        rows = [[str(n), _fmt(_num(v))] for n, v in m.get("evaluations", [])]
        note = (f"target: drop <= {_fmt(_num(m.get('max_drop')))} {m.get('metric')}; FP32 {_fmt(_num(m.get('fp32')))}, INT8 {_fmt(_num(m.get('int8')))}, "
                f"mixed {_fmt(_num(m.get('value')))} ({'met' if m.get('met') else 'not met'}). Kept in FP16: {', '.join(m.get('float_layers') or []) or 'none'}.")
        out.append((f"Mixed precision ({calibrator})", ["layers in FP16", m.get("metric", "metric")], rows, note))
    return out


def _html_table(headers: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(headers: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _title(data: Dict[str, Any]) -> Tuple[str, str]:
    info, results = data["info"], data["results"]
    title = f"quantlab compare: {info.get('model') or 'model'}"
    subtitle = (f"run {results.get('run_id') or '-'} · calibration {info.get('data') or '-'} · eval {info.get('eval_data') or '-'} "
                f"({info.get('eval_batches')} batches) · metric {results.get('metric')} · best INT8 calibrator {results.get('best_calibrator') or '-'}")
    stats = results.get("statistics")
    if stats:
        subtitle += f" · statistics pass {stats['num_batches']} batches, {stats['statistics_seconds']:.1f} s (shared by every calibrator)"
    return title, subtitle


def render_html(data: Dict[str, Any]) -> str:
    title, subtitle = _title(data)
    headers, rows = _result_table(data["results"])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:24px;max-width:1000px}table{border-collapse:collapse;margin:8px 0 16px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}"
        "td:nth-child(-n+2){text-align:left}.note{color:#555;font-size:13px}figure{margin:12px 0}</style></head><body>",
        f"<h1>{escape(title)}</h1><p class='note'>{escape(subtitle)}</p>",
        "<h2>Results</h2>", _html_table(headers, rows),
        "<p class='note'>Δ is the difference to FP32 on the same eval batches; seconds is the evaluation wall time. "
        "INT8 is fake-quantized PyTorch (ONNX Runtime / TensorRT execution is measured by quantlab.runtimes).</p>",
    ]
    for heading, h, r, note in _sections(data):
        parts += [f"<h2>{escape(heading)}</h2>", f"<p class='note'>{escape(note)}</p>", _html_table(h, r)]
    charts = _charts(data)
    if charts:
        parts.append("<h2>Charts</h2>")
    for _, caption, image in charts:
        parts.append(f"<figure>{image}<figcaption class='note'>{escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(data: Dict[str, Any], image_dir: Path, image_prefix: str) -> Tuple[str, Dict[Path, str]]:
    """Markdown text and the SVG files it links to (path -> content)."""
    title, subtitle = _title(data)
    headers, rows = _result_table(data["results"])
    lines = [f"# {title}", "", subtitle, "", "## Results", "", _md_table(headers, rows), ""]
    for heading, h, r, note in _sections(data):
        lines += [f"## {heading}", "", note, "", _md_table(h, r), ""]
    images: Dict[Path, str] = {}
    charts = _charts(data)
    if charts:
        lines += ["## Charts", ""]
    for slug, caption, image in charts:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in slug) + ".svg"
        images[image_dir / name] = image
        lines += [f"![{caption}]({image_prefix}/{name})", "", f"*{caption}*", ""]
    return "\n".join(lines), images


def svg_data_uri(image: str) -> str:
    """A data: URI for an SVG string (for embedding elsewhere, e.g. the dashboard)."""
    return "data:image/svg+xml;base64," + base64.b64encode(image.encode("utf-8")).decode("ascii")


__all__ = ["render_html", "render_markdown", "svg_data_uri"]
