"""Small layout pieces shared by the pages: headers, the run picker, job progress, status badges."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import streamlit as st

from quantlab.errors import QuantlabError
from quantlab.jobs import worker as jobs
from quantlab.ui import data
from quantlab.ui.summaries import format_time

PAGES = Path(__file__).resolve().parent / "views"
SELECTED_RUN = "selected_run"
ACTIVE_JOBS = "active_jobs"
STATUS_BADGE = {"running": ("blue", ":material/progress_activity:"), "done": ("green", ":material/check_circle:"),
                "failed": ("red", ":material/error:"), "interrupted": ("orange", ":material/stop_circle:")}


def remote_code_warning() -> None:
    """On a dashboard served beyond this machine: say that New run executes files a visitor names."""
    import os

    host = os.environ.get("QUANTLAB_UI_REMOTE_HOST")
    if host:
        st.warning(f"This dashboard listens on **{host}** (started with --allow-remote-code): a model spec typed here "
                   "imports and runs that Python file on the server, as the user who started it.", icon=":material/warning:")


def code_trust_gate(run: Dict[str, Any], key: str) -> bool:
    """Whether an action may re-import the run's recorded code; shows why not and asks, when it is someone else's."""
    reasons = data.foreign_code(run)
    if not reasons:
        return True
    st.warning("This run is not clearly yours: re-running it imports its recorded Python file, which runs as you. "
               + "; ".join(reasons) + ".", icon=":material/gpp_maybe:")
    return st.checkbox("I have read that file and trust it", key=f"{key}-trust")


def page(name: str) -> str:
    """Path of a page file for st.switch_page / st.page_link."""
    return str(PAGES / f"{name}.py")


def header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def require_store() -> bool:
    """On an unreadable store shows the error and stops the page (the Runs page names the store)."""
    try:
        data.runs()
    except QuantlabError as exc:
        st.error(f"The run store cannot be read: {exc}", icon=":material/database:")
        st.stop()
    return True


def status_badge(status: str) -> None:
    color, icon = STATUS_BADGE.get(status, ("gray", None))
    st.badge(status, color=color, icon=icon)


def run_label(run: Dict[str, Any]) -> str:
    name = run.get("name") or run.get("model") or run["id"]
    return f"{name} · {run['kind']} · {format_time(run.get('created_at'))} · {run['id'][-6:]}"


def select_run(runs: Sequence[Dict[str, Any]], *, key: str, label: str = "Run", default_id: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """A run selectbox that follows (and sets) the run selected on the Runs page."""
    if not runs:
        return None
    ids = [r["id"] for r in runs]
    by_id = {r["id"]: r for r in runs}
    wanted = default_id or st.session_state.get(SELECTED_RUN)
    if key in st.session_state and st.session_state[key] not in ids:
        del st.session_state[key]
    index = ids.index(wanted) if wanted in ids else 0

    def remember() -> None:
        st.session_state[SELECTED_RUN] = st.session_state[key]

    chosen = st.selectbox(label, ids, index=index, key=key, format_func=lambda i: run_label(by_id[i]), on_change=remember)
    return by_id.get(chosen)


def no_runs(message: str, *, here: str = "") -> None:
    """An empty state with a way forward (links to the pages that make runs)."""
    st.info(message, icon=":material/info:")
    links = st.container(horizontal=True)
    if data.store_is_empty():
        links.page_link(page("welcome"), label="Get started: run the demo", icon=":material/rocket_launch:")
    links.page_link(page("new_run"), label="New run", icon=":material/play_arrow:")
    if here != "runs":
        links.page_link(page("runs"), label="All runs", icon=":material/table_rows:")


def remember_job(run_id: str) -> None:
    st.session_state.setdefault(ACTIVE_JOBS, [])
    if run_id not in st.session_state[ACTIVE_JOBS]:
        st.session_state[ACTIVE_JOBS].append(run_id)


def start_job_button(spec_factory: Callable[[], Any], *, label: str, key: str, type: str = "primary",
                     icon: str = ":material/play_arrow:", help: Optional[str] = None) -> Optional[str]:
    """A button that validates and starts a job; bad input shows st.error (the store stays unchanged)."""
    if not st.button(label, key=key, type=type, icon=icon, help=help):
        return None
    try:
        with st.spinner("Checking the model and data..."):
            run_id = jobs.start_job(spec_factory(), data.store_path())
    except Exception as exc:  # noqa: BLE001 - bad input (or a user module failing to import) is shown, not a traceback
        st.error(f"Could not start the run. {exc}", icon=":material/error:")
        return None
    remember_job(run_id)
    st.session_state[SELECTED_RUN] = run_id
    data.clear_caches()
    st.toast(f"Started run {run_id}", icon=":material/rocket_launch:")
    return run_id


def _job_card(run: Dict[str, Any]) -> None:
    state = jobs.job_state(run)
    with st.container(border=True):
        top = st.columns([5, 1])
        top[0].markdown(f"**{run.get('name') or run['model']}**  \n`{run['id']}`")
        with top[1]:
            status_badge(state["status"])
        if state["status"] == "running":
            text = state["stage"] or "starting..."
            st.progress(min(1.0, state["progress"]), text=f"{text} · {state['progress']:.0%}")
            if state["lost"]:
                st.warning(f"The worker process (pid {state['pid']}) is gone without recording a result. See {state['log']}.")
        elif state["status"] == "done":
            st.progress(1.0, text="done")
            best = None
            try:
                from quantlab.ui.summaries import best_int8

                best = best_int8(data.results(run))
            except QuantlabError:
                pass
            if best is not None:
                st.markdown(f"Best INT8: **{best['label']}**, Δ {best['delta']:+.3g} {best['metric']} vs FP32")
            for note in state["skipped"]:
                st.caption(f"skipped: {note}")
            cols = st.container(horizontal=True)  # buttons as wide as their labels
            if cols.button("Compare", key=f"open-compare-{run['id']}", icon=":material/bar_chart:"):
                st.session_state[SELECTED_RUN] = run["id"]
                st.switch_page(page("compare"))
            if cols.button("Layers", key=f"open-layers-{run['id']}", icon=":material/layers:"):
                st.session_state[SELECTED_RUN] = run["id"]
                st.switch_page(page("layers"))
            if cols.button("Export", key=f"open-export-{run['id']}", icon=":material/download:"):
                st.session_state[SELECTED_RUN] = run["id"]
                st.switch_page(page("export"))
        else:
            st.error(f"Run failed: {state['error'] or 'no error recorded'}", icon=":material/error:")
            if state["log"]:
                st.caption(f"log: {state['log']}")


def _load(run_ids: Sequence[str]) -> List[Dict[str, Any]]:
    runs: List[Dict[str, Any]] = []
    for run_id in run_ids:
        try:
            runs.append(data.run(run_id))
        except QuantlabError:  # deleted meanwhile
            continue
    return runs


def job_list(run_ids: Sequence[str], *, poll_seconds: float = 1.0) -> None:
    """Progress cards for ``run_ids``; while any of them runs, the cards refresh themselves."""
    runs = _load(run_ids)
    if not any(r["status"] == "running" for r in runs):
        for run in runs:
            _job_card(run)
        return

    @st.fragment(run_every=poll_seconds)
    def _cards() -> None:
        current = _load(run_ids)
        for run in current:
            _job_card(run)
        if not any(r["status"] == "running" for r in current):
            data.clear_caches()
            st.rerun(scope="app")  # the whole page (and the navigation) now shows the results

    _cards()
