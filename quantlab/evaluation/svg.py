"""Tiny SVG charts (no plotting library needed): bar charts and histograms with markers."""
from __future__ import annotations

import math
from html import escape
from typing import List, Optional, Sequence, Tuple

PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")
FONT = 'font-family="sans-serif" font-size="11"'


def _finite(values: Sequence[float]) -> List[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def bar_chart(
    labels: Sequence[str],
    series: Sequence[Tuple[str, Sequence[Optional[float]]]],
    *,
    title: str,
    unit: str = "",
    reference: Optional[float] = None,
    reference_label: str = "",
    bar_height: int = 12,
    width: int = 760,
    zoom: bool = False,
) -> str:
    """Horizontal grouped bars: one row per label, one bar per series.

    Args:
        labels: Row labels (e.g. layer names or precision/calibrator).
        series: ``(name, values)`` pairs; None or non-finite values draw no bar
            (infinite values are written as text).
        title: Chart title.
        unit: Axis unit.
        reference: Draw a dashed vertical line at this value (e.g. FP32).
        zoom: Start the axis just below the smallest value instead of at 0, so
            that small differences (cosine 0.98 vs 0.99) are visible.
    """
    values = _finite([v for _, vals in series for v in vals] + ([reference] if reference is not None else []))
    lo = min(0.0, min(values, default=0.0))
    hi = max(values, default=1.0)
    if zoom and values and min(values) > 0:
        spread = hi - min(values)
        lo = max(0.0, min(values) - max(spread, 1e-3 * hi) * 0.5)
    if hi == lo:
        hi = lo + 1.0
    label_width = min(320, 7 * max((len(str(x)) for x in labels), default=4) + 10)
    plot_left, plot_right = label_width, width - 60
    group = bar_height * len(series) + 4
    top = 36 + (14 if len(series) > 1 else 0)
    height = top + group * len(labels) + 30

    def x_of(v: float) -> float:
        return plot_left + (v - lo) / (hi - lo) * (plot_right - plot_left)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<text x="4" y="16" {FONT} font-size="13" font-weight="bold">{escape(title)}</text>']
    if len(series) > 1:
        for i, (name, _) in enumerate(series):
            out.append(f'<rect x="{plot_left + 110 * i}" y="24" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                       f'<text x="{plot_left + 110 * i + 14}" y="33" {FONT}>{escape(name)}</text>')
    for tick in _ticks(lo, hi):
        x = x_of(tick)
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 26}" stroke="#ddd"/>'
                   f'<text x="{x:.1f}" y="{height - 12}" {FONT} text-anchor="middle">{_label(tick)}</text>')
    if unit:
        out.append(f'<text x="{plot_right + 4}" y="{height - 12}" {FONT}>{escape(unit)}</text>')
    for row, label in enumerate(labels):
        y0 = top + row * group
        out.append(f'<text x="{plot_left - 4}" y="{y0 + group / 2 + 3:.1f}" {FONT} text-anchor="end">{escape(str(label))}</text>')
        for i, (name, vals) in enumerate(series):
            v = vals[row] if row < len(vals) else None
            y = y0 + i * bar_height
            if v is None or math.isnan(v):
                continue
            if math.isinf(v):
                out.append(f'<text x="{plot_left + 2}" y="{y + bar_height - 2}" {FONT}>{"∞" if v > 0 else "-∞"}</text>')
                continue
            x0, x1 = sorted((x_of(0.0 if lo <= 0 <= hi else lo), x_of(max(v, lo))))
            out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 0.5):.1f}" height="{bar_height - 2}" '
                       f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(f"{label} {name}: {v:.6g}")}</title></rect>')
            out.append(f'<text x="{x1 + 3:.1f}" y="{y + bar_height - 3}" {FONT} font-size="9">{_label(v)}</text>')
    if reference is not None and math.isfinite(reference):
        x = x_of(reference)
        out.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 26}" stroke="#333" stroke-dasharray="4 3"/>'
                   f'<text x="{x + 3:.1f}" y="{top - 8}" {FONT}>{escape(reference_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def histogram(
    counts: Sequence[int],
    bin_width: float,
    markers: Sequence[Tuple[str, float]],
    *,
    title: str,
    width: int = 760,
    height: int = 190,
    max_bars: int = 256,
) -> str:
    """A log-count histogram of |x| with a vertical line per marker (e.g. each calibrator's amax)."""
    counts = list(counts)
    group = max(1, math.ceil(len(counts) / max_bars))
    merged = [sum(counts[i : i + group]) for i in range(0, len(counts), group)]
    span = len(counts) * bin_width or 1.0
    span = max([span] + [a for _, a in markers if math.isfinite(a)])
    left, right, top, bottom = 46, width - 10, 34, height - 28
    peak = math.log10(max(merged + [1]) + 1)

    def x_of(v: float) -> float:
        return left + v / span * (right - left)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           f'<text x="4" y="14" {FONT} font-size="12" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>']
    for tick in _ticks(0.0, span):
        out.append(f'<text x="{x_of(tick):.1f}" y="{bottom + 14}" {FONT} text-anchor="middle">{_label(tick)}</text>')
    out.append(f'<text x="4" y="{top + 8}" {FONT}>log10</text><text x="4" y="{top + 20}" {FONT}>count</text>')
    step = bin_width * group
    for i, c in enumerate(merged):
        if c <= 0:
            continue
        h = math.log10(c + 1) / peak * (bottom - top)
        out.append(f'<rect x="{x_of(i * step):.1f}" y="{bottom - h:.1f}" width="{max(x_of((i + 1) * step) - x_of(i * step), 0.6):.1f}" '
                   f'height="{h:.1f}" fill="#9ab"/>')
    for k, (name, amax) in enumerate(markers):
        if not math.isfinite(amax):
            continue
        x = x_of(amax)
        colour = PALETTE[k % len(PALETTE)]
        out.append(f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{bottom}" stroke="{colour}" stroke-width="1.5">'
                   f'<title>{escape(f"{name} amax {amax:.6g}")}</title></line>')
        out.append(f'<text x="{min(x + 3, right - 90):.1f}" y="{top - 10 + 10 * (k % 4)}" {FONT} fill="{colour}">{escape(name)} {_label(amax)}</text>')
    out.append("</svg>")
    return "".join(out)
