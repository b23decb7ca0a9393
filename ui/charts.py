"""Altair charts of the dashboard, with ONE colour mapping used everywhere.

Every series has a colour key (:func:`quantlab.ui.summaries.series_key`): ``fp32``,
``fp16``, a calibrator name (INT8 with that calibrator), ``qat`` or ``mixed``. :func:`series_color` maps a key to its
colour, so FP32 is the same navy and ``entropy`` the same green on the Compare
page, the per-layer charts and the histogram rules.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, List, Optional, Sequence

import altair as alt
import pandas as pd

from quantlab.ui.summaries import delta_unit, metric_title, metric_unit

# The one palette. Precisions are blues/greys, calibrators warm/saturated colours.
PALETTE: Dict[str, str] = {
    "fp32": "#1f3b73",
    "fp16": "#6f9fd8",
    "max": "#9d755d",  # not red: red means "bad" on these pages (outside the tolerance)
    "percentile": "#f58518",
    "entropy": "#54a24b",
    "mse": "#b279a2",
    "qat": "#d4a417",
    "mixed": "#2a9d8f",
}
# Calibrators registered by users get a stable colour from this list (by name hash).
_EXTRA = ["#17becf", "#ff9da6", "#bab0ac", "#4c78a8", "#72b7b2", "#88d27a", "#e377c2", "#8c564b"]

PASS_COLOR = "#2e7d32"
ROW_PX = 30
# Streamlit fits the whole chart (axes and legend included) into the height: leave room for them.
AXIS_PX = 80


def rows_height(rows: int, *, minimum: int = 160) -> int:
    return max(minimum, ROW_PX * rows + AXIS_PX)
FAIL_COLOR = "#c62828"


def series_color(key: str) -> str:
    """The colour of a series key (``fp32``, ``fp16``, calibrator, ``qat``, ``mixed``)."""
    key = (key or "").lower()
    if key in PALETTE:
        return PALETTE[key]
    digest = int(hashlib.sha1(key.encode()).hexdigest(), 16)
    return _EXTRA[digest % len(_EXTRA)]


def color_scale(keys: Iterable[str]) -> alt.Scale:
    """An Altair colour scale for the given series keys, in the order given."""
    domain = list(dict.fromkeys(k for k in keys if k is not None))
    return alt.Scale(domain=domain, range=[series_color(k) for k in domain])


def label_color_scale(labels: Sequence[str], keys: Sequence[str]) -> alt.Scale:
    """Colour scale over display labels, coloured by each label's series key."""
    pairs = list(dict.fromkeys(zip(labels, keys)))
    return alt.Scale(domain=[p[0] for p in pairs], range=[series_color(p[1]) for p in pairs])


# -- Compare page -----------------------------------------------------------------------------------
def metric_chart(df: pd.DataFrame, metric: str, *, reference: Optional[float], tolerance: float, higher_is_better: bool) -> alt.Chart:
    """Horizontal bars: the metric per configuration, FP32 and the tolerance limit as rules.

    Args:
        df: Rows with ``label``, ``key``, ``value``, ``delta``.
        metric: Metric name (axis title).
        reference: The FP32 value (None: no rules).
        tolerance: Allowed drop vs FP32 (in metric units).
        higher_is_better: Direction of the metric (where the limit sits).
    """
    labels = list(df["label"])
    scale = label_color_scale(labels, list(df["key"]))
    values = [v for v in df["value"].tolist() if v == v]
    if reference is not None:
        values += [reference, reference - tolerance if higher_is_better else reference + tolerance]
    # The axis starts at 0: a few tenths of a point must not look like a cliff (the Δ chart shows the differences).
    lo, hi = (min(values + [0.0]), max(values + [0.0])) if values else (0.0, 1.0)
    pad = max((hi - lo) * 0.08, 1e-6)
    top = 100.0 if metric_unit(metric) == "%" and 0.0 <= lo and hi <= 100.0 else hi + pad  # a percentage ends at 100
    title = metric_title(metric)
    x = alt.X("value:Q", title=title, scale=alt.Scale(domain=[lo, top], zero=True, clamp=True, nice=False))
    base = alt.Chart(df).encode(y=alt.Y("label:N", sort=labels, title=None))
    bars = base.mark_bar(cornerRadiusEnd=3, height={"band": 0.7}).encode(
        x=x,
        color=alt.Color("label:N", scale=scale, legend=None),
        tooltip=[
            alt.Tooltip("label:N", title="configuration"),
            alt.Tooltip("value:Q", title=title, format=".4g"),
            alt.Tooltip("delta:Q", title=f"Δ vs FP32 ({delta_unit(metric) or 'metric units'})", format="+.4g"),
        ],
    )
    text = base.mark_text(align="left", dx=4, fontSize=12).encode(x=x, text=alt.Text("value:Q", format=".2f" if metric_unit(metric) else ".4g"))
    layers: List[alt.Chart] = [bars, text]
    if reference is not None:
        limit = reference - tolerance if higher_is_better else reference + tolerance
        rules = pd.DataFrame({"value": [reference, limit], "what": ["FP32", f"limit (±{tolerance:g})"],
                              "color": [PALETTE["fp32"], FAIL_COLOR]})
        rule = alt.Chart(rules).mark_rule(strokeDash=[5, 4], strokeWidth=1.5).encode(
            x="value:Q", color=alt.Color("color:N", scale=None), tooltip=["what:N", alt.Tooltip("value:Q", format=".4g")]
        )
        layers.append(rule)
    return alt.layer(*layers).properties(height=rows_height(len(labels)))


def delta_chart(df: pd.DataFrame, *, tolerance: float, higher_is_better: bool, metric: Optional[str] = None) -> alt.Chart:
    """Bars of Δ vs FP32 per configuration, green inside the tolerance, red outside, with a zero line.

    ``metric`` names the unit on the axis ("points" for percent metrics).
    """
    data = df.dropna(subset=["delta"]).copy()
    data["verdict"] = data["within"].map({True: "within tolerance", False: "outside tolerance"})
    limit = -tolerance if higher_is_better else tolerance
    bars = (
        alt.Chart(data)
        .mark_bar(cornerRadiusEnd=3, height={"band": 0.7})
        .encode(
            y=alt.Y("label:N", sort=list(df["label"]), title=None),
            x=alt.X("delta:Q", title=f"Δ vs FP32 ({delta_unit(metric)})" if delta_unit(metric) else "Δ vs FP32"),
            color=alt.Color(
                "verdict:N",
                scale=alt.Scale(domain=["within tolerance", "outside tolerance"], range=[PASS_COLOR, FAIL_COLOR]),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["label:N", alt.Tooltip("delta:Q", format="+.4g"), "verdict:N"],
        )
    )
    rule = alt.Chart(pd.DataFrame({"limit": [limit]})).mark_rule(strokeDash=[5, 4], color=FAIL_COLOR).encode(x="limit:Q")
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="#888").encode(x="zero:Q")
    return alt.layer(bars, rule, zero).properties(height=rows_height(len(df)) + 30)


def runs_side_by_side_chart(df: pd.DataFrame, metric: str) -> alt.Chart:
    """Grouped bars: the metric per configuration for two (or more) runs."""
    labels = list(dict.fromkeys(df["label"]))
    return (
        alt.Chart(df)
        .mark_bar(cornerRadiusEnd=3)
        .encode(
            y=alt.Y("label:N", sort=labels, title=None),
            yOffset=alt.YOffset("run:N"),
            x=alt.X("value:Q", title=metric_title(metric), scale=alt.Scale(zero=True)),
            color=alt.Color("run:N", title="run", scale=alt.Scale(range=["#1f3b73", "#f58518", "#54a24b", "#b279a2"]),
                            legend=alt.Legend(orient="bottom")),
            tooltip=["run:N", "label:N", alt.Tooltip("value:Q", format=".4g"), alt.Tooltip("delta:Q", format="+.4g")],
        )
        .properties(height=rows_height(2 * len(labels)) + 30)
    )


# -- Layers page ------------------------------------------------------------------------------------
def layer_metric_chart(df: pd.DataFrame, field: str, title: str, layer_order: Sequence[str]) -> alt.Chart:
    """Per-layer bars of ``field`` (e.g. ``sqnr_db``), one bar per calibrator in each layer.

    A cosine field is drawn as ``1 − cosine`` on a log axis: every cosine is ~0.999, so on a 0-1 axis all
    bars look equal; the distance from 1 is what differs (lower is better). ``df`` may carry a ``label``
    column (name · type and shape) shown on the axis instead of the bare layer name.
    """
    data = df.copy()
    if "label" not in data:
        data["label"] = data["layer"]
    labels = {name: label for name, label in zip(data["layer"], data["label"])}
    order = [labels.get(name, name) for name in layer_order if name in labels]
    calibrators = list(dict.fromkeys(data["calibrator"]))
    if "cosine" in field:
        data["plotted"] = (1.0 - data[field].astype(float)).clip(lower=1e-9)
        y = alt.Y("plotted:Q", title=f"1 − {title} (log scale, lower is better)", scale=alt.Scale(type="log"),
                  axis=alt.Axis(format=".0e"))
        tooltip_value = alt.Tooltip(f"{field}:Q", title=title, format=".6f")
    else:
        data["plotted"] = data[field].astype(float)
        y = alt.Y("plotted:Q", title=title, scale=alt.Scale(zero=True))
        tooltip_value = alt.Tooltip(f"{field}:Q", title=title, format=".1f")
    chart = (
        alt.Chart(data)
        .mark_bar()
        .encode(
            x=alt.X("label:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30, labelLimit=0, labelOverlap=False)),
            xOffset=alt.XOffset("calibrator:N", sort=calibrators),
            y=y,
            color=alt.Color("calibrator:N", scale=color_scale(calibrators), legend=alt.Legend(orient="top", title="calibrator")),
            tooltip=[alt.Tooltip("label:N", title="layer"), "calibrator:N", tooltip_value],
        )
    )
    return chart.properties(height=420)


def sqnr_heatmap(cells: pd.DataFrame, title: str = "SQNR (dB)") -> alt.Chart:
    """Layer x calibrator heatmap of SQNR in dB, each cell labelled with its value.

    Args:
        cells: :func:`quantlab.ui.summaries.sqnr_matrix` rows (``label``, ``calibrator``, ``value``, ``order``).
        title: Legend title.

    Low SQNR (more quantization noise) is dark; ~6 dB is one bit of precision.
    """
    order = list(dict.fromkeys(cells.sort_values("order", kind="stable")["label"]))
    calibrators = list(dict.fromkeys(cells["calibrator"]))
    base = alt.Chart(cells).encode(
        x=alt.X("calibrator:N", sort=calibrators, title="calibrator", axis=alt.Axis(orient="top", labelAngle=0)),
        y=alt.Y("label:N", sort=order, title=None, axis=alt.Axis(labelLimit=0)),
    )
    rects = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("value:Q", title=title, scale=alt.Scale(scheme="viridis"),
                        legend=alt.Legend(orient="right", format=".0f", gradientLength=max(60, 28 * len(order) - 80))),
        tooltip=[alt.Tooltip("label:N", title="layer"), "calibrator:N", alt.Tooltip("value:Q", title=title, format=".1f")],
    )
    mid = float(cells["value"].median()) if not cells.empty else 0.0
    text = base.mark_text(fontSize=12).encode(
        text=alt.Text("value:Q", format=".1f"),
        color=alt.condition(alt.datum.value < mid, alt.value("white"), alt.value("black")),
    )
    return alt.layer(rects, text).properties(height=max(160, 28 * len(order) + 40))


def sensitivity_chart(df: pd.DataFrame, value_title: str) -> alt.Chart:
    """Horizontal bars of the sensitivity ranking (most sensitive on top), with a zero line.

    Bars are neutral grey-blue: a sensitivity is a measurement, not a verdict.
    """
    data = df.copy()
    if "label" not in data:
        data["label"] = data["layer"]
    order = list(data["label"])
    bars = (
        alt.Chart(data)
        .mark_bar(cornerRadiusEnd=3, color="#4c78a8")
        .encode(
            y=alt.Y("label:N", sort=order, title=None, axis=alt.Axis(labelLimit=0)),
            x=alt.X("sensitivity:Q", title=value_title),
            tooltip=["rank:Q", alt.Tooltip("label:N", title="layer"), alt.Tooltip("sensitivity:Q", format="+.4g"),
                     alt.Tooltip("sqnr_db:Q", title="SQNR (dB)", format=".3g")],
        )
    )
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="#888").encode(x="zero:Q")
    return alt.layer(bars, zero).properties(height=max(160, 24 * len(order) + AXIS_PX))


def histogram_chart(bins: pd.DataFrame, amax: pd.DataFrame, tensor: str) -> alt.Chart:
    """Histogram of |activation| (log count) with each calibrator's amax as a vertical rule.

    Args:
        bins: ``left``, ``right``, ``count`` per (possibly merged) bin; zero counts dropped.
        amax: ``calibrator``, ``amax`` rows.
        tensor: Title.
    """
    calibrators = list(amax["calibrator"])
    top = int(bins["count"].max()) if not bins.empty else 1
    decades = [10 ** k for k in range(0, len(str(max(top, 1))) + 1)]  # grid lines at powers of ten only
    bars = (
        alt.Chart(bins)
        .mark_bar(color="#7b8794", binSpacing=0)
        .encode(
            x=alt.X("left:Q", title=f"|x| at the input of {tensor}", bin="binned"),
            x2="right:Q",
            y=alt.Y("count:Q", title="count (log scale)", scale=alt.Scale(type="log", domain=[1, decades[-1]]),
                    axis=alt.Axis(values=decades, format="~s")),
            y2=alt.datum(1),  # bars start at 1: a log scale has no zero
            tooltip=[alt.Tooltip("left:Q", format=".4g"), alt.Tooltip("right:Q", format=".4g"), alt.Tooltip("count:Q", format=",")],
        )
    )
    rules = (
        alt.Chart(amax)
        .mark_rule(strokeWidth=2.5)
        .encode(
            x="amax:Q",
            color=alt.Color("calibrator:N", scale=color_scale(calibrators), legend=alt.Legend(orient="top", title="amax by calibrator")),
            tooltip=["calibrator:N", alt.Tooltip("amax:Q", format=".5g"), alt.Tooltip("clipped values:N", title="values clipped")],
        )
    )
    return alt.layer(bars, rules).properties(height=380)
