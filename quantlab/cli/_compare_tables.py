"""The tables ``quantlab compare`` prints: accuracy with n / 95% interval / paired test, output fidelity
against FP32, and the deployment cost of the exported files (every column with its unit)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from quantlab.cli._runs_common import fmt, fmt_delta
from quantlab.cli.common import print_table
from quantlab.evaluation import present


def _interval(low: Optional[float], high: Optional[float]) -> str:
    return "-" if low is None or high is None else f"{fmt(low)} – {fmt(high)}"


def print_accuracy(rows: Sequence[Dict[str, Any]], metric: str) -> None:
    """The primary metric per configuration, with n, its 95% interval and the paired test against FP32."""
    unit, points = present.metric_unit(metric), present.delta_unit(metric)
    shown = present.accuracy_rows(rows, metric)
    has_agreement = any(r["agreement"] is not None for r in shown)
    headers = (["configuration", "n", present.with_unit(metric, unit), present.with_unit("95% CI", unit),
                f"Δ vs FP32 ({points})", "p vs FP32", "noise"]
               + ([present.with_unit(shown[0]["agreement_metric"] if shown else "agreement", "%")] if has_agreement else [])
               + [present.PYTORCH_SECONDS])
    lines = []
    for r in shown:
        line = [r["configuration"], fmt(r["n"]), fmt(r["value"]), _interval(r["ci_low"], r["ci_high"]),
                fmt_delta(r["delta"]) if r["precision"] != "fp32" else "-", present.format_p(r["p_value"]), r["noise"]]
        if has_agreement:
            line.append(fmt(r["agreement"]))
        lines.append(line + [f"{r['seconds']:.2f}" if r["seconds"] is not None else "-"])
    print_table(lines, headers)
    used = present.methods(shown)
    if used["interval"] or used["paired test"]:
        print(f"95% CI: {'; '.join(used['interval']) or '-'}. Noise: {'; '.join(used['paired test']) or '-'} on the same "
              "samples; 'within noise' = p >= 0.05 (these samples cannot tell it from FP32).")


def print_other_metrics(rows: Sequence[Dict[str, Any]], metric: str) -> None:
    """The other metrics of each configuration (value and Δ vs FP32), when the task gives more than one."""
    others = [m for m in dict.fromkeys(r["metric"] for r in rows) if m != metric and m not in present.AGREEMENT_METRICS]
    if not others:
        return
    tables = {m: {(r["configuration"]): r for r in present.accuracy_rows(rows, m)} for m in others}
    labels = list(dict.fromkeys(label for table in tables.values() for label in table))
    headers = ["configuration"] + [h for m in others for h in (present.with_unit(m, present.metric_unit(m)),
                                                              f"Δ {m} ({present.delta_unit(m)})")]
    lines = []
    for label in labels:
        line = [label]
        for m in others:
            r = tables[m].get(label)
            line += [fmt(r["value"]) if r else "-", fmt_delta(r["delta"]) if r and r["precision"] != "fp32" else "-"]
        lines.append(line)
    print_table(lines, headers)


def print_fidelity(fidelity: Sequence[Dict[str, Any]]) -> None:
    """Output comparison against FP32 (Polygraphy-style)."""
    shown = present.fidelity_rows(fidelity)
    if not shown:
        return
    print("Output fidelity vs FP32 (the model's main output on the same eval samples):")
    headers = ["configuration", "n", "top-1 agreement (%)", "max abs error", "max rel error", "1 − cos", "KL (nats)"]
    print_table([[r["configuration"], fmt(r["n"]), fmt(r["top1_agreement"]), fmt(r["max_abs_error"], 3),
                  fmt(r["max_rel_error"], 3), fmt(r["one_minus_cosine"], 3), fmt(r["kl_divergence"], 3)] for r in shown], headers)


def print_deployment(deployment: Sequence[Dict[str, Any]]) -> None:
    """Latency per batch and size of the exported ONNX files, with the timing's source."""
    shown = present.deployment_rows(deployment)
    if not shown:
        return
    sizes = present.batch_sizes(shown)
    repeats = next((r["repeats"] for r in shown if r["repeats"]), None)
    warmup = next((r["warmup"] for r in shown if r["warmup"] is not None), None)
    print(f"Deployment cost of the exported ONNX files (median / min ms per batch over {repeats} timed runs after "
          f"{warmup} warmup runs; not PyTorch):")
    headers = (["configuration", "size (MB)"] + [f"batch {b} median / min (ms)" for b in sizes]
               + ["timing source", "TensorRT"])
    lines = []
    for r in shown:
        cells = [f"{fmt(r['median_ms'][b], 3)} / {fmt(r['min_ms'][b], 3)}" if b in r["median_ms"] else "-" for b in sizes]
        lines.append([r["configuration"], fmt(r["size_mb"], 3)] + cells + [r["source_label"] or "-", r["tensorrt"]])
    print_table(lines, headers)
    for r in shown:
        if r["note"]:
            print(f"  {r['configuration']}: {r['note']}")


def print_compare_tables(result: Any) -> None:
    """Every table of a :class:`quantlab.evaluation.compare.CompareResult`."""
    rows: List[Dict[str, Any]] = [r.to_dict() for r in result.rows]
    print_accuracy(rows, result.metric)
    print_other_metrics(rows, result.metric)
    print_fidelity([r.to_dict() for r in result.fidelity])
    print_deployment([r.to_dict() for r in result.deployment])


__all__ = ["print_accuracy", "print_compare_tables", "print_deployment", "print_fidelity", "print_other_metrics"]
