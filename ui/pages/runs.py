"""Runs: every stored run, filter and select; details and shortcuts for the selected one."""
import json

import streamlit as st

from quantlab.ui import components, data

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

event = st.dataframe(
    view,
    key="runs-table",
    hide_index=True,
    placeholder="",
    on_select="rerun",
    selection_mode="single-row",
    column_order=["status", "name", "kind", "model", "eval data", "metric", "FP32", "best INT8 Δ", "best INT8", "progress", "created", "id"],
    column_config={
        "status": st.column_config.TextColumn("status", width="small"),
        "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent", width="small"),
        "FP32": st.column_config.NumberColumn("FP32", format="%.4g"),
        "best INT8 Δ": st.column_config.NumberColumn("best INT8 Δ", format="%+.3g", help="best INT8 result minus FP32, primary metric"),
        "model": st.column_config.TextColumn("model", width="medium"),
        "id": st.column_config.TextColumn("run id", width="medium"),
    },
)
st.caption(f"{len(view)} of {len(table)} runs · select a row for details")

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
    info[0].markdown(f"**Kind**  \n{run['kind']}")
    info[1].markdown(f"**Model**  \n`{run['model']}`")
    info[2].markdown(f"**Data**  \n`{run.get('data') or '-'}` → `{run.get('eval_data') or '-'}`")
    info[3].markdown(f"**Run folder**  \n`{run.get('run_dir') or '-'}`")
    if run.get("error"):
        st.error(run["error"], icon=":material/error:")
    nav = st.columns([1, 1, 1, 5])
    if nav[0].button("Compare", icon=":material/bar_chart:", key="runs-to-compare", disabled=not data.results(run)):
        st.switch_page(components.page("compare"))
    if nav[1].button("Layers", icon=":material/layers:", key="runs-to-layers"):
        st.switch_page(components.page("layers"))
    if nav[2].button("Export", icon=":material/download:", key="runs-to-export"):
        st.switch_page(components.page("export"))
    with st.expander("Config", icon=":material/settings:"):
        st.code(json.dumps(run.get("config") or {}, indent=1), language="json")
    artifacts = data.artifacts(run)
    if artifacts:
        with st.expander(f"Artifacts ({len(artifacts)})", icon=":material/folder:"):
            st.dataframe(artifacts, hide_index=True, column_order=["kind", "path", "run_id", "created_at"])
