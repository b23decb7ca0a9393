"""Layers: where INT8 hurts. Per-layer SQNR/cosine, the sensitivity ranking, activation histograms
with each calibrator's range, and a mixed-precision what-if (some layers in FP16)."""
import shlex

import streamlit as st

from quantlab.errors import QuantlabError
from quantlab.ui import charts, components, data, summaries

components.require_store()
components.header("Layers", "Per-layer error of INT8 vs FP32, which layers the metric is sensitive to, and what keeping them in FP16 buys.")

runs = [r for r in data.runs() if r["kind"] != "sensitivity" and (data.layer_stats(r) or data.scales_files(r))]
if not runs:
    components.no_runs("No run has per-layer statistics yet. A compare run with INT8 records them.")
    st.stop()

with st.columns([4, 3])[0]:
    run = components.select_run(runs, key="layers-run")
layers = data.layers_view(run)
results = data.results(run)
metric = summaries.primary_metric(results)
higher = summaries.higher_is_better(metric) if metric else True
calibrators = list(dict.fromkeys(list(layers["calibrator"]) + list(data.scales_files(run))))
with_sensitivity = [c for c in calibrators if layers[(layers["calibrator"] == c)]["sensitivity"].notna().any()]
layer_order = list(dict.fromkeys(layers["layer"]))
info = data.layer_info(run)

tab_error, tab_rank, tab_hist, tab_mixed = st.tabs(
    ["Per-layer error", "Sensitivity ranking", "Histograms", "Mixed precision"]
)

# -- per-layer SQNR / cosine --------------------------------------------------------------------------
NAMES = summaries.LAYER_COLUMNS


def _layer_details(layer: str) -> None:
    """The chosen layer: its SQNR per calibrator, its sensitivity (if ranked) and its input histogram."""
    rows = layers[layers["layer"] == layer]
    st.markdown(f"**{summaries.layer_label(layer, info)}**")
    per_cal = rows[["calibrator", "sqnr_db", "local_sqnr_db", "sensitivity", "rank"]]
    recovered = f"FP16 gain ({summaries.delta_unit(metric) or metric})"
    st.dataframe(per_cal, hide_index=True, key="layers-detail-table", placeholder="–",
                 column_config={"calibrator": st.column_config.TextColumn("calibrator", width=90),
                                "sqnr_db": st.column_config.NumberColumn("SQNR (dB)", format="%.1f", width=80,
                                                                         help=NAMES["sqnr_db"]),
                                "local_sqnr_db": st.column_config.NumberColumn("alone (dB)", format="%.1f", width=80,
                                                                               help=NAMES["local_sqnr_db"]),
                                "sensitivity": st.column_config.NumberColumn(recovered, format="%+.2f", width=120,
                                                                             help="metric recovered by keeping this layer in FP16"),
                                "rank": st.column_config.NumberColumn("rank", format="%d", width=50)})
    ranked = rows.dropna(subset=["sensitivity"])
    if ranked.empty:
        st.caption("No sensitivity measured for this layer (run a sensitivity ranking to see what FP16 here buys).")
    else:
        best = ranked.iloc[0]
        st.caption(f"Keeping this layer in FP16 ({best['calibrator']}): {summaries.format_delta(best['sensitivity'], metric)} "
                   f"of {metric}, rank {int(best['rank']) if best['rank'] == best['rank'] else '–'} of {len(layer_order)}.")
    if layer in data.tensors_with_histograms(run):
        bins, amax = data.histogram(run, layer)
        st.altair_chart(charts.histogram_chart(bins, amax, layer), width="stretch")
    else:
        st.caption("No saved histogram for this layer's input.")


with tab_error:
    if layers.empty or layers["sqnr_db"].isna().all():
        st.info("This run has no per-layer SQNR (compare with --layer-batches 0?).")
    else:
        c = st.columns([1, 1])  # the three "Measured" choices need ~370 px (1024 px windows included)
        which = c[0].segmented_control(
            "Measured", ["in the INT8 model", "layer alone", "alone, per token"], default="in the INT8 model", key="layers-which",
            help="In the INT8 model: every layer quantized, errors compound. Layer alone: only this layer quantized, FP32 inputs. "
                 "Per token: the mean of each token's (or sample's) SQNR, which exposes ranges set by a few huge outliers "
                 "(the sensitivity proxy).",
        ) or "in the INT8 model"
        fields = {"layer alone": ("local_sqnr_db", "local_cosine"), "alone, per token": ("local_row_sqnr_db", "local_cosine")}
        sqnr_field, cos_field = fields.get(which, ("sqnr_db", "cosine"))
        if layers[sqnr_field].isna().all():  # older runs: not measured
            sqnr_field, cos_field = "sqnr_db", "cosine"
        shown = c[1].multiselect("Calibrators", calibrators, default=calibrators, key="layers-cals")
        sub = layers[layers["calibrator"].isin(shown or calibrators)]
        worst = sub.loc[sub[sqnr_field].idxmin()] if sub[sqnr_field].notna().any() else None
        m = st.columns(3)
        m[0].metric("Quantized layers", len(layer_order), border=True)
        if worst is not None:
            m[1].metric(f"Lowest SQNR · {worst['calibrator']}", f"{worst[sqnr_field]:.1f} dB", border=True,
                        help=f"{NAMES[sqnr_field]}: the lowest over the shown calibrators, with calibrator {worst['calibrator']} "
                             f"at layer {summaries.layer_label(worst['layer'], info)}")
            m[2].metric("Lowest-SQNR layer", worst["layer"], border=True, help=info.get(worst["layer"]) or None)
            if info.get(worst["layer"]):
                m[2].caption(info[worst["layer"]])
        st.markdown(f"**{NAMES[sqnr_field]}, layer × calibrator** (higher is better; ~6 dB per bit)")
        cells = summaries.sqnr_matrix(sub, sqnr_field, info)
        st.altair_chart(charts.sqnr_heatmap(cells, "SQNR (dB)"), width="stretch")
        options = [name for name in layer_order if name in set(sub["layer"])]
        default = options.index(worst["layer"]) if worst is not None and worst["layer"] in options else 0
        picked = st.selectbox("Layer details: histogram and sensitivity", options, index=default, key="layers-pick",
                              format_func=lambda name: summaries.layer_label(name, info))
        if picked:
            _layer_details(picked)
        labelled = sub.assign(label=[summaries.layer_label(n, info) for n in sub["layer"]])
        with st.expander("Per-layer bars: SQNR and cosine", icon=":material/bar_chart:"):
            st.altair_chart(charts.layer_metric_chart(labelled.dropna(subset=[sqnr_field]), sqnr_field, "SQNR (dB)", layer_order),
                            width="stretch")
            st.altair_chart(charts.layer_metric_chart(labelled.dropna(subset=[cos_field]), cos_field, "cosine", layer_order),
                            width="stretch")
        with st.expander("Table", icon=":material/table:"):
            table = sub.assign(layer_type=[info.get(n, "") for n in sub["layer"]])
            table = table[["layer", "layer_type", "calibrator", "sqnr_db", "local_sqnr_db", "local_row_sqnr_db", "cosine", "sensitivity"]]
            numbers = {k: st.column_config.NumberColumn(NAMES[k], format="%.2f", width=95)
                       for k in ("sqnr_db", "local_sqnr_db", "local_row_sqnr_db", "sensitivity")}
            st.dataframe(table.rename(columns=NAMES), hide_index=True, key="layers-table", placeholder="–",
                         column_config={NAMES[k]: c for k, c in numbers.items()}
                         | {NAMES["layer"]: st.column_config.TextColumn(width=110),
                            NAMES["layer_type"]: st.column_config.TextColumn(width=150),
                            NAMES["calibrator"]: st.column_config.TextColumn(width=85),
                            NAMES["cosine"]: st.column_config.NumberColumn(format="%.6f", width=95)})

# -- sensitivity --------------------------------------------------------------------------------------
with tab_rank:
    if not with_sensitivity:
        st.info("No sensitivity ranking for this run yet: run this in a terminal (or start a New run with sensitivity on). "
                "Below: layers ordered by the SQNR proxy (lowest first).")
        st.code(f"quantlab sensitivity --run {shlex.quote(str(run.get('run_dir') or run['id']))}", language="bash")
    rank_cal = st.selectbox("Calibrator", with_sensitivity or calibrators, key="layers-rank-cal")
    ranking = summaries.sensitivity_ranking(layers, rank_cal)
    sens_runs = data.sensitivity_runs(run)
    if sens_runs:
        cfg = sens_runs[0].get("config") or {}
        st.caption(
            f"Method: {str(cfg.get('method', 'everything_but_one')).replace('_', ' ')} (each candidate layer back in float, "
            f"the rest INT8; sensitivity = {metric} recovered). Cost: {cfg.get('cost_passes', float('nan')):.2f} eval passes."
        )
    ranking = ranking.assign(label=[summaries.layer_label(n, info) for n in ranking["layer"]],
                             layer_type=[info.get(n, "") for n in ranking["layer"]])
    recovered = f"{metric} recovered in FP16" + (f" ({summaries.delta_unit(metric)})" if summaries.delta_unit(metric) else "")
    if ranking["sensitivity"].notna().any():
        st.altair_chart(charts.sensitivity_chart(ranking.dropna(subset=["sensitivity"]), recovered), width="stretch")
    st.dataframe(ranking[["rank", "layer", "layer_type", "sensitivity", "local_row_sqnr_db", "sqnr_db", "local_sqnr_db", "cosine"]],
                 hide_index=True, key="layers-ranking", placeholder="–",
                 column_config={"rank": st.column_config.NumberColumn("rank", format="%d", width=50),
                                "layer": st.column_config.TextColumn("layer", width=110),
                                "layer_type": st.column_config.TextColumn(NAMES["layer_type"], width=150),
                                "sensitivity": st.column_config.NumberColumn("FP16 gain", format="%+.2f", width=85, help=recovered),
                                "local_row_sqnr_db": st.column_config.NumberColumn("proxy (dB)", format="%.2f", width=85,
                                                                                   help="per-token SQNR, layer alone (the proxy)"),
                                "sqnr_db": st.column_config.NumberColumn("SQNR (dB)", format="%.2f", width=85, help=NAMES["sqnr_db"]),
                                "local_sqnr_db": st.column_config.NumberColumn("alone (dB)", format="%.2f", width=85,
                                                                               help=NAMES["local_sqnr_db"]),
                                "cosine": st.column_config.NumberColumn("cosine", format="%.6f", width=90, help=NAMES["cosine"])})

# -- histograms ---------------------------------------------------------------------------------------
with tab_hist:
    tensors = data.tensors_with_histograms(run)
    if not tensors:
        st.info("The run's scales files hold no saved histograms.")
    else:
        default = 0
        if not ranking.empty and ranking["layer"].iloc[0] in tensors:
            default = tensors.index(ranking["layer"].iloc[0])
        tensor = st.selectbox("Tensor (input of layer)", tensors, index=default, key="layers-tensor",
                              format_func=lambda name: summaries.layer_label(name, info))
        bins, amax = data.histogram(run, tensor)
        st.altair_chart(charts.histogram_chart(bins, amax, tensor), width="stretch")
        st.markdown("**Range per calibrator**")
        st.dataframe(amax, hide_index=True, key="layers-amax", column_order=["calibrator", "amax", "clipped values"],
                     column_config={"calibrator": st.column_config.TextColumn("calibrator", width=100),
                                    "amax": st.column_config.NumberColumn("amax", format="%.4g", width=80),
                                    "clipped values": st.column_config.TextColumn(
                                        "values clipped", width=220, help="histogram values above amax (count of all values)")})
        if not amax.empty:
            st.caption(f"observed max {amax['observed max'].iloc[0]:.4g}; scale = amax / 127; "
                       f"{int(amax['values'].iloc[0]):,} values in the histogram")

# -- mixed precision ----------------------------------------------------------------------------------
with tab_mixed:
    scales_files = data.scales_files(run)
    mixed_options = [c for c in (with_sensitivity or calibrators) if c in scales_files]
    if not mixed_options:
        st.info("Needs the run's scales files (a compare run with INT8).")
    else:
        c = st.columns([1, 3], vertical_alignment="bottom")
        mixed_cal = c[0].selectbox("Calibrator", mixed_options, key="layers-mixed-cal")
        order = summaries.sensitivity_ranking(layers, mixed_cal)
        options = list(order["layer"]) if not order.empty else layer_order
        picks = st.session_state.setdefault("layers-fp16", [])
        st.session_state["layers-fp16"] = [p for p in picks if p in options]
        quick = c[1].container(horizontal=True)
        for k in (1, 3, 5):
            if quick.button(f"Top {k}", key=f"layers-top-{k}", help=f"the {k} most sensitive layers"):
                st.session_state["layers-fp16"] = options[:k]
        if quick.button("Clear", key="layers-clear", type="tertiary"):
            st.session_state["layers-fp16"] = []
        fp16_layers = st.multiselect("Layers to keep in FP16 (most sensitive first)", options, key="layers-fp16",
                                     format_func=lambda name: summaries.layer_label(name, info))
        int8_row = next((r for r in results if r["precision"] == "int8" and r.get("calibrator") == mixed_cal
                         and r["metric"] == metric and r.get("source", "ptq") == "ptq"), None)
        fp32_row = next((r for r in results if r["precision"] == "fp32" and r["metric"] == metric), None)
        prediction = summaries.predicted_effect(order, fp16_layers, int8_delta=int8_row["delta"] if int8_row else None, higher=higher)
        act = st.container(horizontal=True)
        trusted = components.code_trust_gate(run, "layers-measure")
        measure = act.button("Measure now", key="layers-measure", icon=":material/speed:", disabled=not fp16_layers or not trusted,
                             help="Re-evaluates FP32, all-INT8 and the mixed model on the run's eval data")
        save = act.button("Save as mixed-precision config", key="layers-save", icon=":material/save:", disabled=not fp16_layers)
        if measure:
            try:
                with st.spinner("Evaluating the mixed-precision model..."):
                    st.session_state["layers-measured"] = data.measure_mixed(run, mixed_cal, fp16_layers)
            except (QuantlabError, ValueError, FileNotFoundError, KeyError) as exc:
                st.error(f"Could not measure: {exc}", icon=":material/error:")
        measured = st.session_state.get("layers-measured")
        if not (measured and sorted(measured["layers"]) == sorted(fp16_layers) and measured.get("calibrator") == mixed_cal):
            measured = None
        sign = "normal" if higher else "inverse"
        m = st.columns(5)
        if fp32_row:
            m[0].metric(f"FP32 {metric}", summaries.format_value(fp32_row['value'], metric), border=True)
        if int8_row:
            m[1].metric(f"All INT8 ({mixed_cal})", summaries.format_value(int8_row['value'], metric),
                        delta=summaries.format_delta(int8_row['delta'], metric),
                        delta_color=sign, border=True)
        if prediction["predicted_delta"] is not None and fp32_row:
            m[2].metric(f"Predicted, {len(fp16_layers)} in FP16", summaries.format_value(fp32_row['value'] + prediction['predicted_delta'], metric),
                        delta=summaries.format_delta(prediction['predicted_delta'], metric), delta_color=sign, border=True,
                        help=f"from the stored {prediction['basis']} numbers (no new evaluation)")
        if measured is not None:
            m[3].metric(f"Measured, {len(fp16_layers)} in FP16", summaries.format_value(measured['mixed'], metric),
                        delta=summaries.format_delta(measured['delta'], metric),
                        delta_color=sign, border=True, help="re-evaluated just now on the run's eval batches")
        else:
            m[3].metric(f"Measured, {len(fp16_layers)} in FP16", "–", border=True, help="press Measure now")
        if prediction["noise_share"] is not None:
            m[4].metric("Share of INT8 noise removed", f"{prediction['noise_share']:.1%}", border=True,
                        help="sum of 10^(-SQNR/10) over the chosen layers / over all layers")
        if measured is not None:
            st.caption(
                f"Measured on {measured['batches']} eval batches in {measured['seconds']:.1f} s: FP32 {measured['fp32']:.4g}, "
                f"all INT8 {measured['int8']:.4g} (Δ {measured['int8_delta']:+.3g}), with {', '.join(fp16_layers)} in FP16 "
                f"{measured['mixed']:.4g} (Δ {measured['delta']:+.3g})."
            )
        if save:
            try:
                path = data.save_mixed_config(run, mixed_cal, fp16_layers)
                st.success(f"Saved {path} (scales without {len(fp16_layers)} layer(s); they run in FP16). Find it on the Export page.",
                           icon=":material/save:")
            except (QuantlabError, ValueError, OSError, KeyError) as exc:
                st.error(f"Could not save: {exc}", icon=":material/error:")
