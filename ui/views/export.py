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
    ("checkpoint", "Checkpoint (weights; safetensors where PTQ algorithms changed them)", ":material/save:", None),
    ("onnx", "Q/DQ ONNX", ":material/account_tree:", "application/octet-stream"),
    ("onnx_fp16", "FP16 ONNX", ":material/account_tree:", "application/octet-stream"),
    ("onnx_fp32", "FP32 ONNX (what the cache refers to)", ":material/account_tree:", "application/octet-stream"),
    ("calibration_cache", "Calibration cache (TensorRT ≤ 10)", ":material/memory:", "text/plain"),
    ("report", "Report", ":material/description:", None),
    ("check_report", "Check report", ":material/rule:", "text/markdown"),
    ("check", "Check report (JSON)", ":material/data_object:", "application/json"),
    ("sensitivity", "Sensitivity ranking", ":material/sort:", "application/json"),
    ("summary", "Mixed-precision summary", ":material/tune:", "application/json"),
    ("results", "Results (JSON)", ":material/table:", "application/json"),
]
ZIP_LIMIT_BYTES = 1 << 30  # "Download all" holds the zip in memory
LABELS = {kind: label for kind, label, _, _ in GROUPS}
known = set(LABELS)
by_kind = {}
for art in artifacts:
    by_kind.setdefault(art["kind"] if art["kind"] in known else "other", []).append(art)


SHORT = {"scales": "scales", "mixed_scales": "mixed-precision scales", "onnx": "INT8 Q/DQ ONNX", "onnx_fp16": "FP16 ONNX",
         "onnx_fp32": "FP32 ONNX (cache's graph)", "calibration_cache": "calibration cache", "report": "report",
         "check_report": "check report", "check": "check (JSON)", "sensitivity": "sensitivity", "summary": "mixed summary",
         "results": "results"}


def _label(art, short: bool = False) -> str:
    """The artifact's kind in words; a mixed-precision file says so whatever kind it was recorded as."""
    origin = data.provenance(art["path"])
    if origin.get("float_layers") and art["kind"] in ("scales", "onnx"):
        if short:
            return "mixed-precision " + ("scales" if art["kind"] == "scales" else "ONNX")
        return "Mixed-precision " + ("scales" if art["kind"] == "scales" else "Q/DQ ONNX (INT8 + FP16)")
    if short:
        return SHORT.get(art["kind"], "other")
    return LABELS.get(art["kind"], "Other file")


# -- export any choice --------------------------------------------------------------------------------
choices = data.export_choices(run)
if choices and run["kind"] == "compare" and run["status"] == "done":
    with st.container(border=True):
        st.markdown("**Export from this run** — rebuilds the model from the run folder. INT8: Q/DQ ONNX of the chosen "
                    "calibrator's scales (or a saved mixed-precision configuration), its check report and a calibration "
                    "cache, in `export.<choice>/` of the run folder; the ONNX metadata names the calibrator and algorithms. "
                    "FP16: `model.fp16.onnx` (inputs and outputs stay FP32).")
        row = st.columns([3, 1, 1], vertical_alignment="bottom")
        names = list(choices)
        best = data.best_calibrator(run)
        export_cal = row[0].selectbox("INT8 from", names, index=names.index(best) if best in names else 0, key="export-now-cal",
                                      help="any calibrator of the run, or a saved mixed-precision configuration (layers kept in FP16)")
        trusted = components.code_trust_gate(run, "export-now")
        if row[1].button("Export INT8", key="export-now", type="primary", icon=":material/output:", disabled=not trusted):
            try:
                with st.spinner(f"Exporting Q/DQ ONNX ({export_cal})..."):
                    scales_file = None if export_cal in data.scales_files(run) else choices[export_cal]
                    outcome = data.export_now(run, export_cal, scales_file)
            except Exception as exc:  # noqa: BLE001 - shown in the page, never as a traceback
                st.error(f"Export failed: {exc}", icon=":material/error:")
            else:
                st.session_state["export-now-done"] = outcome
                st.rerun()
        if row[2].button("Export FP16", key="export-fp16", icon=":material/output:", disabled=not trusted):
            try:
                with st.spinner("Exporting FP16 ONNX..."):
                    outcome = data.export_fp16(run)
            except Exception as exc:  # noqa: BLE001 - shown in the page, never as a traceback
                st.error(f"FP16 export failed: {exc}", icon=":material/error:")
            else:
                st.session_state["export-now-done"] = outcome
                st.rerun()
    done = st.session_state.pop("export-now-done", None)
    if done:
        st.success("Exported: " + ", ".join(Path(p).name for p in done["outputs"].values()), icon=":material/check_circle:")

# -- downloads ----------------------------------------------------------------------------------------
st.subheader("Downloads")
onnx_files = [a["path"] for a in by_kind.get("onnx", [])]
m = st.columns(4)
m[0].metric("Scales files", len(by_kind.get("scales", [])) + len(by_kind.get("mixed_scales", [])), border=True)
m[1].metric("ONNX models", len(onnx_files) + len(by_kind.get("onnx_fp16", [])), border=True)
m[2].metric("Calibration caches", len(by_kind.get("calibration_cache", [])), border=True)
m[3].metric("Reports", len(by_kind.get("report", [])) + len(by_kind.get("check_report", [])), border=True)

root = run.get("run_dir")


def _shown_name(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix() if root else path.name
    except ValueError:
        return path.name


ordered = [a for kind, *_ in GROUPS + [("other",)] for a in by_kind.get(kind, [])]
table = pd.DataFrame([{
    "file": _shown_name(Path(a["path"])), "what": _label(a, short=True), "from": data.provenance_text(data.provenance(a["path"])),
} for a in ordered])
st.dataframe(table, hide_index=True, key="export-files", height=min(600, 35 * (len(table) + 1) + 3),
             column_config={"from": st.column_config.TextColumn("from", help="precision, calibrator and PTQ algorithms, "
                                                                "read from the file itself (ONNX metadata, scales file, cache metadata)")})
all_paths = [a["path"] for a in ordered]
total_bytes = sum(Path(p).stat().st_size for p in all_paths)
if total_bytes <= ZIP_LIMIT_BYTES:
    st.download_button(f"Download all ({len(all_paths)} files, {total_bytes / 2**20:.1f} MiB, .zip)",
                       data.zip_artifacts(all_paths, root), file_name=f"quantlab-{run['id']}.zip", mime="application/zip",
                       key="export-zip", icon=":material/folder_zip:", type="primary")
else:  # the zip is built in memory: past this, zip the run folder itself
    st.caption(f"{len(all_paths)} files, {total_bytes / 2**30:.1f} GiB: too large for one in-memory zip; "
               f"download them one by one or zip the run folder `{root}`.")

missing = [label for kind, label, _, _ in GROUPS if kind in ("onnx", "calibration_cache", "report") and kind not in by_kind]
grid = st.columns(3, gap="medium")
i = 0
for art in ordered:
    path = Path(art["path"])
    payload = data.read_bytes(str(path))
    if payload is None:
        continue
    kind = art["kind"] if art["kind"] in known else "other"
    mime = next((g[3] for g in GROUPS if g[0] == kind), None)
    with grid[i % 3].container(border=True):
        st.markdown(f"**{_label(art)}**  \n`{_shown_name(path)}` · {len(payload) / 1024:.1f} KiB")
        origin = data.provenance(str(path))
        if origin:
            st.caption("from: " + data.provenance_text(origin))
        st.download_button("Download", payload, file_name=path.name, mime=mime or "application/octet-stream",
                           key=f"dl-{art['run_id']}-{kind}-{_shown_name(path)}", icon=":material/download:")
    i += 1
if missing:
    st.caption("Not in this run: " + ", ".join(missing) + ".")

# -- check --------------------------------------------------------------------------------------------
st.divider()
st.subheader("Q/DQ placement check (`quantlab check`)")
if not onnx_files:
    st.info("This run has no ONNX model to check.", icon=":material/info:")
else:
    onnx_path = st.selectbox("ONNX model", onnx_files, key="export-onnx",
                             format_func=lambda p: f"{_shown_name(Path(p))} · {data.provenance_text(data.provenance(p))}")
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
        st.markdown("**Where the Q/DQ nodes sit** (`quantlab check --table`)")
        try:
            qdq = data.qdq_rows(onnx_path)
        except (QuantlabError, ValueError, OSError) as exc:
            st.error(f"Could not list the Q/DQ nodes of {Path(onnx_path).name}: {exc}", icon=":material/error:")
            qdq = []
        if qdq:
            short = {"QuantizeLinear": "Q", "DequantizeLinear": "DQ"}

            def _feeds(r) -> str:
                ops = sorted({short.get(c.split(" ", 1)[0], c.split(" ", 1)[0]) for c in r["consumers"]})
                return f"{r['quantized']} → {', '.join(ops) or '-'}"

            # Narrow enough for the page; node and tensor names are in the full table (CSV) and `quantlab check --table`.
            frame = pd.DataFrame([{
                "layer": r["layer"] or r["tensor"], "op": r["op"], "quantizes": _feeds(r), "scale": r["scale"],
                "zero point": f"{r['zero_point']} ({r['dtype']})",
            } for r in qdq])
            st.dataframe(frame, hide_index=True, key="export-qdq", column_config={
                "layer": st.column_config.TextColumn("layer", help="quantlab's quantizer (module:input or module:weight); "
                                                     "the ONNX tensor when the file does not name one"),
                "quantizes": st.column_config.TextColumn("quantizes", help="activation or weight → the ops reading the output"),
                "scale": st.column_config.TextColumn("scale", help="per tensor; per channel: channel count, axis, smallest..largest"),
            })
            full = pd.DataFrame([{
                "node": r["node"], "op": r["op"], "quantized": r["quantized"], "layer": r["layer"], "tensor": r["tensor"],
                "feeds": "; ".join(r["consumers"]), "scale": r["scale"], "zero point": r["zero_point"], "type": r["dtype"],
                "axis": r["axis"], "scales": " ".join(f"{v:.9g}" for v in r["scales"]),
            } for r in qdq])
            st.download_button("Full Q/DQ table (CSV: node and tensor names, every scale)", full.to_csv(index=False).encode(),
                               file_name=f"{Path(onnx_path).stem}.qdq.csv", mime="text/csv", key="export-qdq-csv",
                               icon=":material/download:")
            st.caption(f"{len(qdq)} Q/DQ node(s): {sum(r['op'] == 'Q' for r in qdq)} Q, {sum(r['op'] == 'DQ' for r in qdq)} DQ; "
                       f"{sum(r['quantized'] == 'weight' for r in qdq)} on weights. Scale = amax / 127.")

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
        fp32 = by_kind.get("onnx_fp32", [{}])[0].get("path", "model.fp32.onnx")
        for cache in caches:
            header = (data.read_bytes(cache["path"]) or b"").split(b"\n", 1)[0].decode("ascii", "replace")
            origin = data.provenance(cache["path"])
            algorithm = header.rsplit("-", 1)[-1] if header.startswith("TRT-") else "EntropyCalibration2"
            st.caption(
                f"`{_shown_name(Path(cache['path']))}` header `{header}`: for implicit INT8 on exactly that TensorRT "
                f"(≤ 10; 11 removed it). {data.cache_header_note(algorithm, origin.get('calibrator'))}"
            )
        st.caption(f"For another version: `quantlab cache --scales <scales.json> --onnx {Path(fp32).name} "
                   "--trt-version X.Y.Z --out calibration.cache`.")
else:
    st.info("Export a Q/DQ ONNX model first (the demo does; or `quantlab export`).", icon=":material/info:")
