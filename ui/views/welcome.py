"""Get started: shown while the run store is empty; runs the built-in demo in one click."""
import streamlit as st

from quantlab.ui import components
from quantlab.jobs.demo_spec import default_out_dir, demo_spec

components.require_store()
components.header("Welcome to quantlab", "INT8 quantization workbench: calibrate, compare FP32 / FP16 / INT8, export Q/DQ ONNX for TensorRT.")

jobs_here = st.session_state.get(components.ACTIVE_JOBS, [])
left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("Try it on the built-in demo")
    st.markdown(
        "One click runs the whole workflow on a small residual CNN and real **Fashion-MNIST** images:\n\n"
        "1. one statistics pass, then **every calibrator** (max, percentile, entropy, MSE) picks its ranges;\n"
        "2. **FP32, FP16 and INT8** are scored on the same test images;\n"
        "3. each layer's SQNR and a **sensitivity ranking** show where INT8 costs accuracy;\n"
        "4. the best calibrator is exported as **Q/DQ ONNX**, checked against TensorRT's placement rules,\n"
        "   with a legacy **calibration cache** beside it.\n\n"
        "It takes a minute or two on a laptop CPU and runs in the background: you can leave this page."
    )
    started = components.start_job_button(lambda: demo_spec(default_out_dir("runs/demo")), label="Run the demo",
                                          key="welcome-demo", icon=":material/rocket_launch:")
    if started:
        jobs_here = st.session_state.get(components.ACTIVE_JOBS, [])
    demo = demo_spec()
    st.caption(f"Model `{demo.model}` · calibration `{demo.calib_data}` · eval `{demo.eval_data}`")
with right:
    st.subheader("Or bring your own model")
    st.markdown(
        "- **New run**: a `module:factory` or `file.py:factory` model, any data spec "
        "(`csv:`, `parquet:`, `imagefolder:` ...), the calibrators and precisions you want.\n"
        "- From a terminal (records into the same run store; this dashboard picks it up):"
    )
    st.code("quantlab compare --model MODULE:FACTORY --data csv:calib.csv \\\n"
            "    --eval csv:test.csv --out runs/x", language="bash")
    st.page_link(components.page("new_run"), label="New run", icon=":material/play_arrow:")
    st.page_link(components.page("runs"), label="Runs", icon=":material/table_rows:")

if jobs_here:
    st.divider()
    st.subheader("Progress")
    components.job_list(jobs_here)
