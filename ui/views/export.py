"""Export: download what a run produced, read the Q/DQ placement check, build (or say how to build)
the TensorRT engine."""
from pathlib import Path

import pandas as pd
import streamlit as st

from quantlab.errors import QuantlabError
from quantlab.ui import components, data

components.require_store()
components.header("Export", "Scales, Q/DQ ONNX for TensorRT, the legacy calibration cache and reports of a run.")

runs = [r for r in data.runs() if r.get("parent_id") is None and data.artifacts(r)]
if not runs:
    components.no_runs("No run has artifacts yet. A compare run writes scales files; the demo also exports Q/DQ ONNX.")
    st.stop()

with st.columns([4, 3])[0]:
    run = components.select_run(runs, key="export-run")
artifacts = [a for a in data.artifacts(run) if Path(a["path"]).is_file()]

GROUPS = [
    ("scales", "Scales (JSON)", ":material/straighten:", "application/json"),
    ("mixed_scales", "Mixed-precision scales", ":material/tune:", "application/json"),
    ("onnx", "Q/DQ ONNX", ":material/account_tree:", "application/octet-stream"),
    ("onnx_fp32", "FP32 ONNX (what the cache refers to)", ":material/account_tree:", "application/octet-stream"),
    ("calibration_cache", "Calibration cache (TensorRT ≤ 10)", ":material/memory:", "text/plain"),
    ("report", "Report", ":material/description:", None),
    ("check_report", "Check report", ":material/rule:", "text/markdown"),
    ("check", "Check report (JSON)", ":material/data_object:", "application/json"),
    ("sensitivity", "Sensitivity ranking", ":material/sort:", "application/json"),
    ("results", "Results (JSON)", ":material/table:", "application/json"),
]
known = {g[0] for g in GROUPS}
by_kind = {}
for art in artifacts:
    by_kind.setdefault(art["kind"] if art["kind"] in known else "other", []).append(art)

st.subheader("Downloads")
onnx_files = [a["path"] for a in by_kind.get("onnx", [])]
m = st.columns(4)
m[0].metric("Scales files", len(by_kind.get("scales", [])), border=True)
m[1].metric("ONNX models", len(onnx_files), border=True)
m[2].metric("Calibration caches", len(by_kind.get("calibration_cache", [])), border=True)
m[3].metric("Reports", len(by_kind.get("report", [])) + len(by_kind.get("check_report", [])), border=True)

missing = [label for kind, label, _, _ in GROUPS if kind in ("onnx", "calibration_cache", "report") and kind not in by_kind]
grid = st.columns(3, gap="medium")
i = 0
for kind, label, icon, mime in GROUPS + [("other", "Other files", ":material/draft:", None)]:
    for art in by_kind.get(kind, []):
        path = Path(art["path"])
        payload = data.read_bytes(str(path))
        if payload is None:
            continue
        with grid[i % 3].container(border=True):
            st.markdown(f"**{label}**  \n`{path.name}` · {len(payload) / 1024:.1f} KiB")
            st.download_button("Download", payload, file_name=path.name, mime=mime or "application/octet-stream",
                               key=f"dl-{art['run_id']}-{kind}-{path.name}", icon=":material/download:")
        i += 1
scales_by_cal = data.scales_files(run)
if not onnx_files and scales_by_cal and run["kind"] == "compare" and run["status"] == "done":
    with st.container(border=True):
        st.markdown("**No Q/DQ ONNX yet.** Export one from this run's scales "
                    "(rebuilds the model from the run folder; also writes the check report and a calibration cache).")
        row = st.columns([2, 1, 3], vertical_alignment="bottom")
        names = list(scales_by_cal)
        best = data.best_calibrator(run)
        export_cal = row[0].selectbox("Calibrator", names, index=names.index(best) if best in names else 0, key="export-now-cal")
        trusted = components.code_trust_gate(run, "export-now")
        if row[1].button("Export now", key="export-now", type="primary", icon=":material/output:", disabled=not trusted):
            try:
                with st.spinner("Exporting Q/DQ ONNX..."):
                    outcome = data.export_now(run, export_cal)
            except Exception as exc:  # noqa: BLE001 - shown in the page, never as a traceback
                st.error(f"Export failed: {exc}", icon=":material/error:")
            else:
                st.session_state["export-now-done"] = outcome
                st.rerun()
elif missing:
    st.caption("Not in this run: " + ", ".join(missing) + ".")

# -- check --------------------------------------------------------------------------------------------
st.divider()
st.subheader("Q/DQ placement check (`quantlab check`)")
if not onnx_files:
    st.info("This run has no ONNX model to check.", icon=":material/info:")
else:
    onnx_path = st.selectbox("ONNX model", onnx_files, format_func=lambda p: Path(p).name, key="export-onnx")
    try:
        report = data.check_report(onnx_path)
    except (QuantlabError, ValueError, FileNotFoundError) as exc:
        st.error(f"Could not check {Path(onnx_path).name}: {exc}", icon=":material/error:")
        report = None
    if report is not None:
        c = st.columns(5)
        c[0].metric("Result", "OK" if report["ok"] else "errors", border=True)
        c[1].metric("Errors", report["num_errors"], border=True)
        c[2].metric("Warnings", report["num_warnings"], border=True)
        c[3].metric("Q/DQ nodes", report["num_qdq"], border=True)
        c[4].metric("Weighted ops quantized", f"{report['num_weighted_quantized']} / {report['num_weighted']}", border=True)
        findings = pd.DataFrame(report["findings"], columns=["severity", "rule", "node", "op_type", "message"])
        if findings.empty:
            st.success("Every rule passed: TensorRT can fuse this Q/DQ placement as intended.", icon=":material/check_circle:")
        else:
            def _sev(row: pd.Series) -> list:
                color = {"error": "rgba(198,40,40,0.15)", "warning": "rgba(245,133,24,0.15)"}.get(row["severity"], "")
                return [f"background-color: {color}" if color else "" for _ in row]

            st.dataframe(findings.style.apply(_sev, axis=1), hide_index=True, key="export-findings")
        st.caption(f"opset {report['opset']} · {report['num_nodes']} nodes · {onnx_path}")

# -- TensorRT -----------------------------------------------------------------------------------------
st.divider()
st.subheader("TensorRT engine")
if onnx_files:
    onnx_path = st.session_state.get("export-onnx") or onnx_files[0]
    plan_path = str(Path(onnx_path).with_suffix(".plan"))
    trt = data.tensorrt_info()
    try:
        sparse = data.onnx_sparsity(onnx_path)
    except (QuantlabError, OSError):
        sparse = {"compliant": 0, "eligible": 0, "layers": 0}
    try:
        command = data.trtexec_command(onnx_path, plan_path, sparse["compliant"] > 0)
    except QuantlabError as exc:
        command = None
        st.warning(str(exc), icon=":material/construction:")
    if trt["available"]:
        st.success(f"TensorRT {trt['version'] or ''} is installed.", icon=":material/check_circle:")
        if st.button("Build TensorRT engine", key="export-build", type="primary", icon=":material/construction:"):
            try:
                with st.spinner("Building the engine (strongly typed; this can take minutes)..."):
                    built = data.build_engine(run, onnx_path, plan_path)
                st.success(f"Engine written to {built}", icon=":material/check_circle:")
            except (QuantlabError, RuntimeError, OSError) as exc:
                st.error(f"Engine build failed: {exc}", icon=":material/error:")
    else:
        st.info(f"TensorRT is not installed here. Install it (needs an NVIDIA GPU) with:\n\n"
                f"```\n{trt['install']}\n```", icon=":material/info:")
    if command:
        st.markdown("Equivalent `trtexec` command:")
        st.code(command, language="bash", wrap_lines=True)
        if sparse["compliant"]:
            st.caption(
                f"2:4 sparsity: {sparse['compliant']} of {sparse['eligible']} eligible layer(s) hold the pattern in their INT8 "
                "weights, so the command adds `--sparsity=enable` (TensorRT's documented flag; TensorRT cannot run here, so "
                "unverified). TensorRT picks a sparse kernel per layer only where it times faster."
            )
    caches = by_kind.get("calibration_cache", [])
    if caches:
        header = (data.read_bytes(caches[0]["path"]) or b"").split(b"\n", 1)[0].decode("ascii", "replace")
        fp32 = by_kind.get("onnx_fp32", [{}])[0].get("path", "model.fp32.onnx")
        st.caption(
            f"Calibration cache header `{header}`: for implicit INT8 on exactly that TensorRT (≤ 10; 11 removed it). "
            f"For another version: `quantlab cache --scales <scales.json> --onnx {Path(fp32).name} --trt-version X.Y.Z --out calibration.cache`."
        )
else:
    st.info("Export a Q/DQ ONNX model first (the demo does; or `quantlab export`).", icon=":material/info:")
