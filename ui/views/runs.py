"""Runs: every stored run, filter and select; details and shortcuts for the selected one."""
import json

import streamlit as st

from quantlab.ui import components, data, summaries

components.require_store()
components.header("Runs", "Every run recorded in the run store: by this dashboard, `quantlab compare`, `sensitivity`, `qat`, `export` ...")

table = data.runs_table()
if table.empty:
    components.no_runs("No runs yet. Start one from **New run**, or run the demo from **Get started**.", here="runs")
    st.stop()

counts = table["status"].value_counts()
m = st.columns(4)
m[0].metric("Runs", len(table), border=True)
m[1].metric("Running", int(counts.get("running", 0)), border=True)
m[2].metric("Done", int(counts.get("done", 0)), border=True)
m[3].metric("Failed", int(counts.get("failed", 0)), border=True)

running = table[table["status"] == "running"]["id"].tolist()
if running:
    with st.expander(f"{len(running)} run(s) in progress", expanded=True, icon=":material/progress_activity:"):
        components.job_list(running)

f = st.columns([3, 2, 2])
text = f[0].text_input("Filter", placeholder="model, data, name or id", key="runs-filter", icon=":material/search:")
kinds = f[1].multiselect("Kind", sorted(table["kind"].unique()), key="runs-kinds", placeholder="all kinds")
statuses = f[2].multiselect("Status", ["running", "done", "failed", "interrupted"], key="runs-status", placeholder="any status")

view = table
if text:
    needle = text.lower()
    hay = view[["id", "name", "model", "data", "eval data"]].astype(str).apply(lambda col: col.str.lower())
    view = view[hay.apply(lambda col: col.str.contains(needle, regex=False)).any(axis=1)]
if kinds:
    view = view[view["kind"].isin(kinds)]
if statuses:
    view = view[view["status"].isin(statuses)]
view = view.reset_index(drop=True)

shown = view.assign(**{
    "FP32 shown": [summaries.format_value(v, m) for v, m in zip(view["FP32"], view["metric"])],
    "FP16 shown": [summaries.format_value(v, m) for v, m in zip(view["FP16"], view["metric"])],
    "best shown": [f"{label.replace('INT8 ', '')} {summaries.format_delta(d, m)}" if label else ""
                   for label, d, m in zip(view["best INT8"], view["best INT8 Δ"], view["metric"])],
    "status shown": [f"{s} {p:.0%}" if s == "running" else s for s, p in zip(view["status"], view["progress"])],
    "name shown": [n if n.strip("↳ ") else f"{'↳ ' if n.startswith('↳') else ''}{k}" for n, k in zip(view["name"], view["kind"])],
})
# Widths in pixels that add up to less than the main column at 1024 px (no horizontal scrolling);
# long names end in an ellipsis here and are shown whole in the details below.
event = st.dataframe(
    shown,
    key="runs-table",
    hide_index=True,
    placeholder="",
    on_select="rerun",
    selection_mode="single-row",
    column_order=["status shown", "name shown", "kind", "model name", "metric", "FP32 shown", "FP16 shown", "best shown", "duration s"],
    column_config={
        "status shown": st.column_config.TextColumn("status", width=70),
        "name shown": st.column_config.TextColumn("name", width=140, help="↳: started from the run above"),
        "kind": st.column_config.TextColumn("kind", width=80),
        "model name": st.column_config.TextColumn("model", width=125, help="the model spec, shortened (whole in the details)"),
        "metric": st.column_config.TextColumn("metric", width=60, help="the run's primary metric"),
        "FP32 shown": st.column_config.TextColumn("FP32", width=68, help="FP32 value of the primary metric"),
        "FP16 shown": st.column_config.TextColumn("FP16", width=68, help="FP16 value of the primary metric"),
        "best shown": st.column_config.TextColumn("best INT8 (Δ vs FP32)", width=150,
                                                  help="the INT8 configuration closest to FP32, and its difference "
                                                       "(percentage points for % metrics)"),
        "duration s": st.column_config.NumberColumn("duration", width=64, format="%.0f s",
                                                    help="wall time from start to the last update"),
    },
)
st.caption(f"{len(view)} of {len(table)} runs · select a row for details · run store `{data.store_path()}`")

rows = event.selection.rows if event is not None else []
selected_id = view.loc[rows[0], "id"] if rows else st.session_state.get(components.SELECTED_RUN)
if selected_id not in set(table["id"]):
    selected_id = None
if rows:
    st.session_state[components.SELECTED_RUN] = selected_id
if selected_id:
    run = data.run(selected_id)
    st.divider()
    head = st.columns([6, 1])
    head[0].subheader(run.get("name") or run["model"])
    with head[1]:
        components.status_badge(run["status"])
    info = st.columns(4)
    seconds = summaries.run_seconds(run)
    info[0].markdown(f"**Kind**  \n{run['kind']}  \n**Started** {summaries.format_time(run.get('created_at'))}"
                     + (f" · {seconds:.0f} s" if seconds is not None else ""))
    info[1].markdown(f"**Model**  \n`{run['model']}`")
    info[2].markdown(f"**Data**  \n`{run.get('data') or '-'}` → `{run.get('eval_data') or '-'}`")
    info[3].markdown(f"**Run folder**  \n`{run.get('run_dir') or '-'}`")
    if run.get("error"):
        st.error(run["error"], icon=":material/error:")
    nav = st.container(horizontal=True)  # buttons as wide as their labels (columns cut "Compare" at 1024 px)
    if nav.button("Compare", icon=":material/bar_chart:", key="runs-to-compare", disabled=not data.results(run)):
        st.switch_page(components.page("compare"))
    if nav.button("Layers", icon=":material/layers:", key="runs-to-layers"):
        st.switch_page(components.page("layers"))
    if nav.button("Export", icon=":material/download:", key="runs-to-export"):
        st.switch_page(components.page("export"))
    with st.expander("Config", icon=":material/settings:"):
        st.code(json.dumps(run.get("config") or {}, indent=1), language="json")
    artifacts = data.artifacts(run)
    if artifacts:
        with st.expander(f"Artifacts ({len(artifacts)})", icon=":material/folder:"):
            st.dataframe(artifacts, hide_index=True, column_order=["kind", "path", "run_id"],
                         column_config={"kind": st.column_config.TextColumn(width=120),
                                        "path": st.column_config.TextColumn(width=420),
                                        "run_id": st.column_config.TextColumn("run id", width=220)})
