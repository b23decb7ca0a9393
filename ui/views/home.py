"""The front door (the app's root URL): Get started while the run store is empty, else Runs.

A router page keeps every other page's URL stable (/runs, /welcome, ...): the
page that is the default is served at the root instead of its own path.
"""
import streamlit as st

from quantlab.ui import components, data

st.switch_page(components.page("welcome" if data.store_is_empty() else "runs"))
