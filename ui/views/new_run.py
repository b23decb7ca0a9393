"""New run: choose a model, data, calibrators and precisions; the job runs in a background worker
and this page follows its progress (a browser refresh does not stop it)."""
from pathlib import Path

import streamlit as st

from quantlab.data.spec import columns_spec
from quantlab.jobs import inputs
from quantlab.jobs.demo_spec import PRECISIONS, JobSpec, default_out_dir, demo_spec
from quantlab.jobs.errors import JobInputError
from quantlab.ui import components, data

NO_LABEL = "(no label: unlabeled data)"

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
UPLOAD, CSV_UPLOAD = "Upload a file", "CSV file"
model_from = st.segmented_control("Model from", ["Name or path", UPLOAD], default="Name or path", key="new-model-from",
                                  help="a module:factory / file.py:factory / .pt / .pt2 typed below, or a file from your computer")
uploaded_model, uploaded_weights, trusted = None, None, True
if model_from == UPLOAD:
    with st.container(border=True):
        up = st.columns([3, 2], gap="large")
        model_file = up[0].file_uploader("Model file", type=[s.lstrip(".") for s in inputs.MODEL_SUFFIXES], key="new-model-file",
                                         help="file.py with a factory function, a TorchScript archive (torch.jit.save) or an "
                                              "exported program (.pt2). Pickled modules (torch.save(model)) are refused.")
        weights_file = up[1].file_uploader("Weights (optional state_dict)", type=[s.lstrip(".") for s in inputs.WEIGHTS_SUFFIXES],
                                           key="new-weights-file", help="torch.save(model.state_dict()); loaded with weights_only=True")
        if model_file is not None:
            try:
                saved = inputs.save_upload(model_file.getvalue(), model_file.name, data.input_folder())
                uploaded_model = inputs.check_model_file(saved)
            except JobInputError as exc:
                st.error(f"Model file refused. {exc}", icon=":material/error:")
            else:
                st.caption(f"Saved as `{uploaded_model.path}` · {uploaded_model.note}")
                if uploaded_model.kind == "python":
                    st.text_input("Factory function in the file", value="build", key="new-factory",
                                  help="called with no arguments, returns the torch.nn.Module")
                if uploaded_model.runs_code:
                    trusted = st.checkbox(f"I have read {model_file.name} and trust it: using it runs what it holds on this "
                                          "machine, as the user running the dashboard", key="new-model-trust")
        if weights_file is not None:
            try:
                uploaded_weights = inputs.check_weights_file(
                    inputs.save_upload(weights_file.getvalue(), weights_file.name, data.input_folder()))
            except JobInputError as exc:
                st.error(f"Weights file refused. {exc}", icon=":material/error:")
            else:
                st.caption(f"Weights saved as `{uploaded_weights}`")

source = st.segmented_control("Data", ["Built-in Fashion-MNIST", "Dataset spec", CSV_UPLOAD], default="Built-in Fashion-MNIST",
                              key="new-source", help="Fashion-MNIST ships with quantlab's Debian data package; "
                                                     "a spec reads your own files (csv:, parquet:, json:, arrow:, imagefolder:); "
                                                     "or a CSV (uploaded, or a path) whose input and label columns you pick")
builtin = source not in ("Dataset spec", CSV_UPLOAD)
csv_specs = None
if source == CSV_UPLOAD:
    with st.container(border=True):
        files = st.columns(2, gap="large")
        calib_csv = files[0].file_uploader("Calibration CSV", type=["csv"], key="new-calib-file")
        calib_typed = files[0].text_input("…or its path on this machine", key="new-calib-path", placeholder="/data/calib.csv")
        eval_csv = files[1].file_uploader("Eval CSV (empty: the calibration file)", type=["csv"], key="new-eval-file")
        eval_typed = files[1].text_input("…or its path on this machine", key="new-eval-path", placeholder="/data/test.csv")
        saved_csv = {}
        for role, upload, typed in (("calibration", calib_csv, calib_typed), ("eval", eval_csv, eval_typed)):
            try:
                if upload is not None:
                    path = inputs.save_upload(upload.getvalue(), upload.name, data.input_folder())
                elif typed.strip():
                    path = Path(typed.strip()).expanduser().resolve()
                    if not path.is_file():
                        raise JobInputError("data", f"no such file: {path}")
                else:
                    continue
                saved_csv[role] = (path, inputs.csv_header(path))
            except JobInputError as exc:
                st.error(f"{role.capitalize()} CSV refused. {exc}", icon=":material/error:")
        if "calibration" in saved_csv:
            calib_path, header = saved_csv["calibration"]
            eval_path, eval_header = saved_csv.get("eval", (calib_path, header))
            if eval_header != header:
                st.error(f"The eval CSV's columns {eval_header} differ from the calibration CSV's {header}.", icon=":material/error:")
            else:
                guess = next((c for c in header if c.lower() in ("label", "labels", "target", "y", "class")), header[-1])
                cols = st.columns([1, 3], gap="large")
                label = cols[0].selectbox("Label column", header + [NO_LABEL], index=header.index(guess), key="new-label-col")
                label = None if label == NO_LABEL else label
                features = [c for c in header if c != label]
                chosen = cols[1].multiselect("Input columns (in this order, stacked into one vector)", features, default=features,
                                             key=f"new-input-cols-{label or 'none'}")  # a new label: all others again
                try:
                    csv_specs = (columns_spec(f"csv:{calib_path}", chosen, label), columns_spec(f"csv:{eval_path}", chosen, label))
                except ValueError as exc:
                    st.error(str(exc), icon=":material/error:")
                else:
                    st.caption(f"Calibration data `{csv_specs[0]}`  \nEval data `{csv_specs[1]}`")

with st.form("new-run-form", border=True):
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("**Model**")
        if uploaded_model is not None:
            factory = st.session_state.get("new-factory", "build").strip() or "build"
            model = f"{uploaded_model.path}:{factory}" if uploaded_model.kind == "python" else str(uploaded_model.path)
            st.markdown(f"Model `{model}`")
            weights = str(uploaded_weights) if uploaded_weights is not None else ""
        else:
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
        elif source == CSV_UPLOAD:
            calib_data, eval_data = csv_specs or ("", "")
            st.caption("From the CSV file, with the columns chosen above." if csv_specs else "Upload a CSV (or give its path) above.")
        else:
            calib_data = st.text_input("Calibration data", key="new-calib", placeholder="csv:data/calib.csv",
                                       help="fmnist:calib[:N], csv:PATH, parquet:PATH, json:PATH, arrow:DIR, imagefolder:DIR, ...; "
                                            "csv:PATH?inputs=A,B&label=C names the columns")
            eval_data = st.text_input("Eval data", key="new-eval", placeholder="csv:data/test.csv[:1000]",
                                      help="the same kinds of spec; [:N] keeps the first N samples")
        metric = st.selectbox("Metric", metric_names, index=metric_names.index("top1") if "top1" in metric_names else 0, key="new-metric",
                              accept_new_options=True, help="a built-in metric or module:function")
        sizes = st.columns(2)
        batch_size = sizes[0].number_input("Batch size", min_value=1, value=demo.batch_size, step=32, key="new-batch")
        eval_batches = sizes[1].number_input("Max eval batches (0 = all)", min_value=0, value=0, key="new-eval-batches")
        st.markdown("**Output**")
        out = st.columns(2)
        default_dir = default_out_dir()
        out_dir = out[0].text_input("Run folder", value="", placeholder=default_dir, key="new-out",
                                    help="a relative folder is under the dashboard's working folder")
        name = out[1].text_input("Name", value="", placeholder="shown on the Runs page", key="new-name")
        st.caption(f"Run folder (empty field): `{Path(default_dir).resolve()}`  \nA relative folder is created under `{Path.cwd()}`")
    submitted = st.form_submit_button("Start run", type="primary", icon=":material/play_arrow:")

if submitted:
    spec = JobSpec(
        model=model, weights=weights.strip() or None,
        calib_data=calib_data, eval_data=eval_data,
        metric=metric or "top1", calibrators=list(calibrators), precisions=list(precisions or ["fp32"]),
        batch_size=int(batch_size), eval_batches=int(eval_batches) or None,
        sensitivity=sensitivity, export=export, out_dir=out_dir.strip() or default_out_dir(), name=name.strip() or None,
    )
    run_folder = Path(spec.out_dir).expanduser().resolve()
    if "int8" in spec.precisions and not calibrators:
        st.error("Pick at least one calibrator for INT8.", icon=":material/error:")
    elif model_from == UPLOAD and uploaded_model is None:
        st.error("model: upload a model file (or choose 'Name or path').", icon=":material/error:")
    elif not trusted:
        st.error(f"model: tick 'I have read {uploaded_model.path.name} and trust it' first: nothing runs until you do.",
                 icon=":material/gpp_maybe:")
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
            st.success(f"Started run `{run_id}` in `{run_folder}`; it runs in the background (you can leave or refresh this page).",
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
