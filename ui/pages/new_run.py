"""New run: choose a model, data, calibrators and precisions; the job runs in a background worker
and this page follows its progress (a browser refresh does not stop it)."""
import streamlit as st

from quantlab.ui import components, data
from quantlab.jobs.demo_spec import PRECISIONS, JobSpec, default_out_dir, demo_spec

components.require_store()
components.remote_code_warning()
components.header("New run", "Calibrate with every calibrator you pick, score FP32 / FP16 / INT8 on the same eval data, optionally rank layers and export.")


@st.cache_data(show_spinner=False)
def _choices():
    from quantlab.calibrators import list_calibrators
    from quantlab.evaluation.tasks import list_metrics

    return list(list_calibrators()), list(list_metrics())


calibrator_names, metric_names = _choices()
demo = demo_spec()

with st.container(border=True):
    d = st.columns([4, 1], vertical_alignment="center")
    d[0].markdown(f"**Built-in demo** · residual CNN on Fashion-MNIST, every calibrator, FP32/FP16/INT8, sensitivity, "
                  f"Q/DQ ONNX + check + calibration cache. About a minute or two on a CPU.")
    with d[1]:
        components.start_job_button(lambda: demo_spec(default_out_dir("runs/demo")), label="Run the demo",
                                    key="new-demo", icon=":material/rocket_launch:")

st.subheader("Your model")
source = st.segmented_control("Data", ["Built-in Fashion-MNIST", "Dataset spec"], default="Built-in Fashion-MNIST",
                              key="new-source", help="Fashion-MNIST ships with quantlab's Debian data package; "
                                                     "a spec reads your own files (csv:, parquet:, json:, arrow:, imagefolder:)")
builtin = source != "Dataset spec"
with st.form("new-run-form", border=True):
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("**Model**")
        model = st.text_input("Model", value=demo.model, key="new-model",
                              help="package.module:factory, path/to/file.py:factory (called with no arguments), "
                                   "a TorchScript .pt or an exported .pt2 file")
        weights = st.text_input("Weights (optional)", key="new-weights", placeholder="state_dict .pt, loaded with weights_only=True")
        st.markdown("**Quantization**")
        calibrators = st.multiselect("Calibrators", calibrator_names, default=calibrator_names, key="new-calibrators")
        precisions = st.pills("Precisions", list(PRECISIONS), selection_mode="multi", default=list(PRECISIONS), key="new-precisions",
                              help="FP32 always runs: it is the reference")
        opts = st.columns(2)
        sensitivity = opts[0].checkbox("Rank layers (sensitivity)", value=True, key="new-sensitivity")
        export = opts[1].checkbox("Export Q/DQ ONNX + cache", value=True, key="new-export")
    with right:
        st.markdown("**Data**")
        if builtin:
            n = st.columns(2)
            calib_n = n[0].select_slider("Calibration images", [128, 256, 512, 1024], value=512, key="new-calib-n")
            eval_n = n[1].select_slider("Eval images (test set)", [500, 1000, 2000, 5000, 10000], value=2000, key="new-eval-n")
            calib_data, eval_data = f"fmnist:calib[:{calib_n}]", f"fmnist:test[:{eval_n}]"
        else:
            calib_data = st.text_input("Calibration data", key="new-calib", placeholder="csv:data/calib.csv",
                                       help="fmnist:calib[:N], csv:PATH, parquet:PATH, json:PATH, arrow:DIR, imagefolder:DIR, ...")
            eval_data = st.text_input("Eval data", key="new-eval", placeholder="csv:data/test.csv[:1000]",
                                      help="the same kinds of spec; [:N] keeps the first N samples")
        metric = st.selectbox("Metric", metric_names, index=metric_names.index("top1") if "top1" in metric_names else 0, key="new-metric",
                              accept_new_options=True, help="a built-in metric or module:function")
        sizes = st.columns(2)
        batch_size = sizes[0].number_input("Batch size", min_value=1, value=demo.batch_size, step=32, key="new-batch")
        eval_batches = sizes[1].number_input("Max eval batches (0 = all)", min_value=0, value=0, key="new-eval-batches")
        st.markdown("**Output**")
        out = st.columns(2)
        out_dir = out[0].text_input("Run folder", value="", placeholder=default_out_dir(), key="new-out")
        name = out[1].text_input("Name", value="", placeholder="shown on the Runs page", key="new-name")
    submitted = st.form_submit_button("Start run", type="primary", icon=":material/play_arrow:")

if submitted:
    spec = JobSpec(
        model=model, weights=weights.strip() or None,
        calib_data=calib_data, eval_data=eval_data,
        metric=metric or "top1", calibrators=list(calibrators), precisions=list(precisions or ["fp32"]),
        batch_size=int(batch_size), eval_batches=int(eval_batches) or None,
        sensitivity=sensitivity, export=export, out_dir=out_dir.strip() or default_out_dir(), name=name.strip() or None,
    )
    if "int8" in spec.precisions and not calibrators:
        st.error("Pick at least one calibrator for INT8.", icon=":material/error:")
    else:
        try:
            with st.spinner("Checking the model and data..."):
                from quantlab.jobs.worker import start_job

                run_id = start_job(spec, data.store_path())
        except Exception as exc:  # noqa: BLE001 - any bad input is shown in the page, never as a traceback
            st.error(f"Could not start the run. {exc}", icon=":material/error:")
        else:
            components.remember_job(run_id)
            st.session_state[components.SELECTED_RUN] = run_id
            data.clear_caches()
            st.success(f"Started run `{run_id}`; it runs in the background (you can leave or refresh this page).",
                       icon=":material/rocket_launch:")

# This session's jobs first, then any dashboard job still running or just finished (so a
# browser refresh, or another tab, shows the same progress and results).
active = list(st.session_state.get(components.ACTIVE_JOBS, []))[::-1]
dashboard_jobs = [r for r in data.runs() if r["kind"] == "compare" and "job" in (r.get("config") or {})]
running = [r["id"] for r in dashboard_jobs if r["status"] == "running"]
recent = [r["id"] for r in dashboard_jobs[:3]]
shown = list(dict.fromkeys(active + running + recent))
if shown:
    st.divider()
    st.subheader("Jobs")
    components.job_list(shown)
