"""The quantlab dashboard: declares the pages (``quantlab ui`` runs this file with Streamlit).

Layout lives in ``views/*.py``, data access in :mod:`quantlab.ui.data`. The root
URL opens "Get started" (runs the built-in demo in one click) while the run store
is empty, else Runs; "Get started" leaves the menu once there are runs.
"""
from pathlib import Path

import streamlit as st

from quantlab.ui import data

st.set_page_config(page_title="quantlab", page_icon=":material/memory:", layout="wide")

# Not "pages/": a folder of that name beside the main script makes Streamlit serve a deep link
# (/compare on a fresh server) as its file alone, without this navigation (multipage apps v1).
PAGES = Path(__file__).resolve().parent / "views"
empty = data.store_is_empty()
pages = [
    st.Page(PAGES / "home.py", title="quantlab", icon=":material/home:", default=True, visibility="hidden"),
    st.Page(PAGES / "welcome.py", title="Get started", icon=":material/rocket_launch:", url_path="welcome",
            visibility="visible" if empty else "hidden"),
    st.Page(PAGES / "runs.py", title="Runs", icon=":material/table_rows:", url_path="runs"),
    st.Page(PAGES / "compare.py", title="Compare", icon=":material/bar_chart:", url_path="compare"),
    st.Page(PAGES / "layers.py", title="Layers", icon=":material/layers:", url_path="layers"),
    st.Page(PAGES / "new_run.py", title="New run", icon=":material/play_arrow:", url_path="new-run"),
    st.Page(PAGES / "export.py", title="Export", icon=":material/download:", url_path="export"),
]
# Navigation on top: the whole window width is left to the tables (no sidebar to clip them at 1024 px).
st.navigation(pages, position="top").run()
