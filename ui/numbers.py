"""What INT8 buys and costs, for the Compare page: accuracy with n / 95% interval / paired test,
output fidelity against FP32, and the deployment cost of the exported files.

The frames are built from the stored rows only (through :mod:`quantlab.evaluation.present`,
which the CLI uses too), so the numbers shown are the numbers stored.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import pandas as pd
import streamlit as st

from quantlab.evaluation import present

FIDELITY_COLUMNS = {
    "configuration": "configuration",
    "n": "n",
    "top1_agreement": "top-1 agreement (%)",
    "max_abs_error": "max abs error",
    "max_rel_error": "max rel error",
    "one_minus_cosine": "1 − cos",
    "kl_divergence": "KL (nats)",
}


def interval_text(low: Any, high: Any, digits: int = 4) -> Optional[str]:
    """``"90.49 – 94.64"`` (None where no interval is stored)."""
    if low is None or high is None or low != low or high != high:
        return None
    return f"{low:.{digits}g} – {high:.{digits}g}"


def accuracy_frame(results: Sequence[Mapping[str, Any]], metric: str) -> pd.DataFrame:
    """One row per configuration: value, n, 95% interval, Δ, p vs FP32, noise verdict, agreement, PyTorch seconds."""
    rows = present.accuracy_rows(results, metric)
    columns = ["configuration", "n", "value", "ci", "ci_low", "ci_high", "delta", "p", "noise", "agreement", "seconds"]
    return pd.DataFrame([{
        "configuration": r["configuration"], "n": r["n"], "value": r["value"], "ci": interval_text(r["ci_low"], r["ci_high"]),
        "ci_low": r["ci_low"], "ci_high": r["ci_high"], "delta": r["delta"] if r["precision"] != "fp32" else None,
        "p": present.format_p(r["p_value"]), "noise": r["noise"], "agreement": r["agreement"], "seconds": r["seconds"],
    } for r in rows], columns=columns)


def fidelity_frame(fidelity: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The stored fidelity rows with readable column names."""
    rows = present.fidelity_rows(fidelity)
    return pd.DataFrame([{FIDELITY_COLUMNS[k]: r.get(k) for k in FIDELITY_COLUMNS} for r in rows], columns=list(FIDELITY_COLUMNS.values()))


def deployment_frame(deployment: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per configuration: size (MB), median and min ms per batch at each batch size, the source label, TensorRT."""
    rows = present.deployment_rows(deployment)
    sizes = present.batch_sizes(rows)
    out: List[Dict[str, Any]] = []
    for r in rows:
        entry: Dict[str, Any] = {"configuration": r["configuration"], "size (MB)": r["size_mb"]}
        for b in sizes:
            entry[f"batch {b} median (ms)"] = r["median_ms"].get(b)
            entry[f"batch {b} min (ms)"] = r["min_ms"].get(b)
        entry["timing source"] = r["source_label"]
        entry["TensorRT"] = r["tensorrt"]
        entry["note"] = r["note"]
        out.append(entry)
    columns = ["configuration", "size (MB)"] + [f"batch {b} {w} (ms)" for b in sizes for w in ("median", "min")] + \
        ["timing source", "TensorRT", "note"]
    return pd.DataFrame(out, columns=columns)


SENSITIVITY_TEST = "McNemar exact (proportions) or paired t (means)"


def sensitivity_noise(ranking: pd.DataFrame) -> List[str]:
    """The noise verdict of each ranked layer's recovery: within / outside noise, or "-" where not evaluated."""
    if "sensitivity_within_noise" not in ranking:
        return ["-"] * len(ranking)
    out = []
    for value in ranking["sensitivity_within_noise"]:
        if value is None or value != value:
            out.append("-")
        else:
            out.append("within noise" if bool(value) else "outside noise")
    return out


def show_fidelity(fidelity: Sequence[Mapping[str, Any]]) -> None:
    frame = fidelity_frame(fidelity)
    st.subheader("Output fidelity vs FP32")
    if frame.empty:
        st.caption("Not recorded for this run (runs before quantlab recorded output fidelity).")
        return
    st.caption(
        "The model's main output on the same eval samples, compared with FP32's (Polygraphy-style): largest element "
        "error, largest relative error (where FP32's value is not 0), 1 − mean cosine per sample, mean KL divergence "
        "of the softmax (logits only) and the share of samples with FP32's top-1."
    )
    st.dataframe(frame, hide_index=True, key="compare-fidelity",
                 column_config={"top-1 agreement (%)": st.column_config.NumberColumn(format="%.2f"),
                                "max abs error": st.column_config.NumberColumn(format="%.3g"),
                                "max rel error": st.column_config.NumberColumn(format="%.3g"),
                                "1 − cos": st.column_config.NumberColumn(format="%.3e"),
                                "KL (nats)": st.column_config.NumberColumn(format="%.3e")})


def show_deployment(deployment: Sequence[Mapping[str, Any]]) -> None:
    frame = deployment_frame(deployment)
    st.subheader("Deployment cost (exported ONNX files)")
    if frame.empty:
        st.caption("Not measured for this run (`quantlab compare --no-latency`, or a run recorded before it was measured).")
        return
    rows = present.deployment_rows(deployment)
    repeats = next((r["repeats"] for r in rows if r["repeats"]), None)
    warmup = next((r["warmup"] for r in rows if r["warmup"] is not None), None)
    st.caption(
        f"Each configuration exported to ONNX (INT8 in the exact integer form ONNX Runtime runs on this CPU) and timed "
        f"in the runtime named under 'timing source': median and min ms per batch (bs: batch size) over {repeats} timed runs after "
        f"{warmup} warmup runs. Size: the .onnx file in MB. TensorRT is timed only where it is installed. "
        "PyTorch fake-quant time is not a deployment cost and is not used here."
    )
    # Widths: the table must fit a 1024 px window without scrolling sideways.
    config = {"configuration": st.column_config.Column(width=125),
              "size (MB)": st.column_config.NumberColumn(format="%.3f", width=75),
              "timing source": st.column_config.Column(width=195),
              "TensorRT": st.column_config.Column(width=95)}
    config.update({c: st.column_config.NumberColumn(c.replace("batch ", "bs ").replace("median", "med.").replace(" (ms)", " ms"),
                                                    format="%.3f", width=88, help=c)
                   for c in frame.columns if c.endswith("(ms)")})
    st.dataframe(frame.drop(columns=["note"]) if frame["note"].isna().all() else frame, hide_index=True,
                 key="compare-deployment", column_config=config)


__all__ = ["accuracy_frame", "deployment_frame", "fidelity_frame", "interval_text", "sensitivity_noise", "show_deployment",
           "show_fidelity"]
