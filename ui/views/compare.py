"""Compare: the metric for FP32, FP16 and INT8 per calibrator (and QAT / mixed / 2:4 sparse runs) of a run,
deltas vs FP32 judged against a tolerance you set; 2:4 + INT8 rows with their measured GPU speed where
recorded; optionally a second run side by side."""
import pandas as pd
import streamlit as st

from quantlab.ui import charts, components, data, summaries

components.require_store()
components.header("Compare", "FP32 vs FP16 vs INT8 per calibrator on the same eval data. Δ = value − FP32.")

runs = data.runs_with_results()
if not runs:
    components.no_runs("No run has results yet. Start one from **New run** (or `quantlab compare`).")
    st.stop()

top = st.columns([4, 2, 2])
with top[0]:
    run = components.select_run(runs, key="compare-run")
results = data.results(run)
related = data.related_results(run)
if related and st.toggle(f"Include {len({r['run_id'] for r in related})} QAT / mixed-precision / 2:4 run(s) on the same model and eval data",
                         value=True, key=f"compare-related-{run['id']}"):
    results = results + related
metrics = list(dict.fromkeys(r["metric"] for r in results))
primary = summaries.primary_metric(results)
metric = top[1].selectbox("Metric", metrics, index=metrics.index(primary), key=f"compare-metric-{run['id']}")
higher = summaries.higher_is_better(metric)
frame = summaries.results_frame(results, metric)
fp32_rows = frame[frame["precision"] == "fp32"]
fp32 = float(fp32_rows["value"].iloc[0]) if not fp32_rows.empty else None
default_tol = 0.5 if (fp32 is not None and abs(fp32) > 1.5) else 0.005  # points for %, units for fractions
tolerance = top[2].number_input(
    f"Tolerance ({'max drop' if higher else 'max rise'} vs FP32)", min_value=0.0, value=default_tol, step=default_tol / 5,
    format="%.4g", key=f"compare-tol-{run['id']}", help="Configurations whose Δ vs FP32 is worse than this are flagged red.",
)
judged = summaries.judge(frame, tolerance=tolerance, higher=higher)

# -- headline numbers ---------------------------------------------------------------------------------
best = summaries.best_int8(results, metric)
fp16 = judged[(judged["precision"] == "fp16") & (judged["source"] == "ptq")]
within = judged[judged["precision"] != "fp32"]["within"]
cards = st.columns(4)
cards[0].metric(f"FP32 {metric}", summaries.format_value(fp32, metric), border=True)
if not fp16.empty:
    cards[1].metric(f"FP16 {metric}", summaries.format_value(fp16['value'].iloc[0], metric),
                    delta=summaries.format_delta(fp16['delta'].iloc[0], metric),
                    delta_color="normal" if higher else "inverse", border=True)
else:
    cards[1].metric(f"FP16 {metric}", "-", border=True)
if best is not None:
    cards[2].metric(f"Best INT8 · {best['label'].replace('INT8 ', '')}", summaries.format_value(best['value'], metric),
                    delta=summaries.format_delta(best['delta'], metric),
                    delta_color="normal" if higher else "inverse", border=True)
else:
    cards[2].metric("Best INT8", "-", border=True)
cards[3].metric("Within tolerance", f"{int(within.sum())} / {len(within)}", border=True)

# -- table and charts ---------------------------------------------------------------------------------
def _highlight(row: pd.Series) -> list:
    color = "" if row["within"] else "background-color: rgba(198, 40, 40, 0.15)"
    ok = "color: #2e7d32; font-weight: 600" if row["within"] else "color: #c62828; font-weight: 600"
    return [ok if col in ("Δ vs FP32", "verdict") else color for col in row.index]

table = judged.rename(columns={"label": "configuration", "value": metric, "delta": "Δ vs FP32"})
table["verdict"] = ["✓ within" if w else "✗ outside" for w in table["within"]]
table.loc[table["precision"] == "fp32", "verdict"] = "reference"
shown = table[["configuration", metric, "Δ vs FP32", "verdict", "seconds", "within"]]
styled = shown.style.apply(_highlight, axis=1).format({metric: "{:.3f}", "Δ vs FP32": "{:+.3f}", "seconds": "{:.2f}"}, na_rep="-")

left, right = st.columns([1, 1], gap="large")
with left:
    st.subheader("Results")
    st.dataframe(styled, hide_index=True, key="compare-table", column_order=[c for c in shown.columns if c != "within"],
                 column_config={"seconds": st.column_config.NumberColumn("eval s", help="wall time of the eval pass")})
    run_cfg = run.get("config") or {}
    st.caption(
        f"Model `{run['model']}` · eval `{run.get('eval_data') or '-'}` · calibration `{run.get('data') or '-'}`"
        + (f" · {run_cfg.get('eval_batches')} eval batches" if run_cfg.get("eval_batches") else "")
    )
with right:
    st.subheader(f"{metric} by configuration")
    st.caption("Dashed navy: FP32; dashed red: the tolerance limit.")
    st.altair_chart(charts.metric_chart(judged, metric, reference=fp32, tolerance=tolerance, higher_is_better=higher), width="stretch")
sparse = summaries.sparse_summary(results, metric)
if not sparse.empty:
    st.subheader("2:4 structured sparsity + INT8")
    st.caption(
        f"{metric} of the 2:4-pruned INT8 model (one-shot pruning + PTQ, and after sparse QAT where a QAT run is included) "
        "and its measured latency vs FP16 on one eval batch. Latency is measured only on an NVIDIA GPU with cuSPARSELt "
        "(`quantlab compare --sparsity 2:4 --device cuda`); '-' means not measured for this run. TensorRT itself was not run."
    )
    st.dataframe(
        sparse.rename(columns={"label": "configuration", "value": metric, "delta": "Δ vs FP32"}), hide_index=True, key="compare-sparse",
        column_config={metric: st.column_config.NumberColumn(format="%.4f"), "Δ vs FP32": st.column_config.NumberColumn(format="%+.4f"),
                       "latency_ms": st.column_config.NumberColumn("2:4 INT8 ms", format="%.3f"),
                       "fp16_latency_ms": st.column_config.NumberColumn("FP16 ms", format="%.3f"),
                       "speedup_vs_fp16": st.column_config.NumberColumn("speed-up vs FP16", format="%.2fx")},
    )

st.subheader("Δ vs FP32")
st.caption(f"Dashed red: the tolerance limit ({'−' if higher else '+'}{tolerance:g}); grey: no change.")
st.altair_chart(charts.delta_chart(judged, tolerance=tolerance, higher_is_better=higher, metric=metric), width="stretch")

if run["status"] == "running":
    st.info("This run is still running: results appear as each configuration finishes.", icon=":material/progress_activity:")
    components.job_list([run["id"]])

# -- side by side -------------------------------------------------------------------------------------
st.divider()
others = [r for r in runs if r["id"] != run["id"]]
if st.toggle("Compare with another run", key="compare-side-by-side", disabled=not others,
             help=None if others else "Only one run has results so far."):
    other = components.select_run(others, key="compare-other", label="Second run", default_id=others[0]["id"])
    unrelated = summaries.unrelated_reasons(run, other, layers_a=data.layer_info(run), layers_b=data.layer_info(other))
    if unrelated:
        st.warning("These runs are not of the same model and eval data, so their numbers are not comparable: "
                   + "; ".join(unrelated) + ".", icon=":material/compare_arrows:")
    other_frame = summaries.results_frame(data.results(other), metric)
    if other_frame.empty:
        st.warning(f"Run {other['id']} has no `{metric}` results.")
    else:
        a, b = components.run_label(run), components.run_label(other)
        both = pd.concat([frame.assign(run=a), other_frame.assign(run=b)], ignore_index=True)
        cols = st.columns(2, gap="large")
        for col, (title, sub) in zip(cols, ((a, frame), (b, other_frame))):
            with col:
                st.markdown(f"**{title}**")
                st.dataframe(sub[["label", "value", "delta", "seconds"]].rename(columns={"label": "configuration", "value": metric, "delta": "Δ vs FP32"}),
                             hide_index=True, column_config={metric: st.column_config.NumberColumn(format="%.4f"),
                                                             "Δ vs FP32": st.column_config.NumberColumn(format="%+.4f")})
        merged = frame[["label", "value"]].merge(other_frame[["label", "value"]], on="label", how="outer", suffixes=(" A", " B"))
        merged["B − A"] = merged["value B"] - merged["value A"]
        st.markdown("**Difference (second run − this run)**")
        st.dataframe(merged.rename(columns={"label": "configuration"}), hide_index=True, key="compare-merged",
                     column_config={c: st.column_config.NumberColumn(format="%.4f") for c in ("value A", "value B")}
                     | {"B − A": st.column_config.NumberColumn(format="%+.4f")})
        st.altair_chart(charts.runs_side_by_side_chart(both, metric), width="stretch")
