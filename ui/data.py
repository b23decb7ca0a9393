"""Data access for the pages: the run store and quantlab functions behind Streamlit caches.

Pages never open the store or call quantlab directly; they call these. The
store is only read here: everything that records (a new run, an export, a
mixed-precision scales file, an engine) is a job of :mod:`quantlab.jobs`.
Reads that change while a job runs (the runs list) are cached for about a
second; reads of a finished run are keyed by the run's ``updated_at`` and files
by their modification time, so a cache entry is never stale.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
import streamlit as st

from quantlab.errors import QuantlabError
from quantlab.jobs import autoprecision, export, runs as recorded
from quantlab.roles import Role
from quantlab.store import STORE_ENV, RunStore, default_store_path
from quantlab.ui import summaries

TENSORRT_INSTALL = "pip install --extra-index-url https://pypi.nvidia.com tensorrt"


def store_path() -> str:
    """The store this dashboard shows: ``$QUANTLAB_STORE`` (set by ``quantlab ui``), else the default."""
    env = os.environ.get(STORE_ENV)
    return str(Path(env).expanduser().resolve()) if env else str(default_store_path().resolve())


@st.cache_resource(show_spinner=False)
def _store(path: str) -> RunStore:
    return RunStore(path)


def input_folder() -> str:
    """Where uploaded run inputs are saved (``inputs/`` beside the run store file)."""
    from quantlab.jobs.inputs import input_folder as folder

    return str(folder(store_path()))


def store() -> RunStore:
    """The RunStore (one per path per server; each call opens its own connection)."""
    return _store(store_path())


# -- runs ---------------------------------------------------------------------------------------------
@st.cache_data(ttl=1.0, show_spinner=False)
def _runs(path: str) -> List[Dict[str, Any]]:
    return _store(path).list_runs()


def runs() -> List[Dict[str, Any]]:
    """Every run, newest first."""
    return _runs(store_path())


def run(run_id: str) -> Dict[str, Any]:
    """One run (fresh: status and progress change while it runs)."""
    return store().get_run(run_id)


#: The per-run tables of the store (RunStore methods ``name(run_id)``) that :func:`_run_rows` reads.
_RUN_TABLES = ("results", "layer_stats", "fidelity", "deployment", "artifacts")


# One cached loader for every per-run table: the table is an argument, so it is part of the cache
# key (separate functions made by a factory would share one cache: Streamlit keys a cached function
# by its name and source). ``updated_at`` is only part of the key: a write to the run makes a new entry.
@st.cache_data(show_spinner=False, max_entries=256 * len(_RUN_TABLES))
def _run_rows(path: str, table: str, run_id: str, updated_at: str) -> List[Dict[str, Any]]:
    if table not in _RUN_TABLES:
        raise ValueError(f"unknown run table {table!r}; expected one of {', '.join(_RUN_TABLES)}")
    return getattr(_store(path), table)(run_id)


def _rows(run: Dict[str, Any], table: str) -> List[Dict[str, Any]]:
    return _run_rows(store_path(), table, run["id"], run.get("updated_at") or "")


def results(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    return _rows(run, "results")


def layer_stats(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    return _rows(run, "layer_stats")


def fidelity(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The run's output-fidelity rows against FP32 (empty for runs recorded before they existed)."""
    return _rows(run, "fidelity")


def deployment(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The run's deployment-cost rows (latency and size of the exported files; empty for older runs)."""
    return _rows(run, "deployment")


def artifacts(run: Dict[str, Any], *, with_children: bool = True) -> List[Dict[str, Any]]:
    """The run's artifacts, plus those of runs started from it (exports, autoprecision)."""
    rows = [dict(a, run_id=run["id"]) for a in _rows(run, "artifacts")]
    if with_children:
        for child in runs():
            if child.get("parent_id") == run["id"]:
                rows += [dict(a, run_id=child["id"]) for a in _rows(child, "artifacts")]
    return rows


def related_results(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """QAT, mixed-precision and 2:4 rows of runs on the same model and eval data (or started from ``run``).

    Each row keeps its own delta (vs the FP32 value that run measured) and says
    which run it came from (``run_id``).
    """
    rows: List[Dict[str, Any]] = []
    for other in runs():
        if other["id"] == run["id"] or other["kind"] not in ("qat", "autoprecision") or other["status"] != "done":
            continue
        same_setup = other.get("model") == run.get("model") and other.get("eval_data") == run.get("eval_data")
        if other.get("parent_id") == run["id"] or same_setup:
            rows += [dict(r, run_id=other["id"]) for r in results(other) if r.get("source") in ("qat", "mixed", "sparse", "sparse-qat")]
    return rows


def runs_table() -> pd.DataFrame:
    """The Runs page table (one row per run, best INT8 delta)."""
    all_runs = runs()
    by_run = {r["id"]: results(r) for r in all_runs}
    return summaries.runs_frame(all_runs, by_run)


def runs_with_results() -> List[Dict[str, Any]]:
    """Runs with metric rows, except mixed-precision runs of a stored compare run (shown inside it)."""
    ids = {r["id"] for r in runs()}
    return [r for r in runs() if results(r) and not (r["kind"] == "autoprecision" and r.get("parent_id") in ids)]


def runs_with_layers() -> List[Dict[str, Any]]:
    return [r for r in runs() if layer_stats(r) or scales_files(r)]


# -- files --------------------------------------------------------------------------------------------
def _mtime(path: str) -> int:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return -1


def scales_files(run: Dict[str, Any]) -> Dict[str, str]:
    """Calibrator name -> scales file of the run (artifacts of kind ``scales`` that exist)."""
    out: Dict[str, str] = {}
    for art in artifacts(run):
        if art["kind"] == "scales" and Path(art["path"]).is_file():
            name = Path(art["path"]).name
            calibrator = name[len("scales."):-len(".json")] if name.startswith("scales.") and name.endswith(".json") else Path(name).stem
            out.setdefault(calibrator, art["path"])
    return out


@st.cache_resource(show_spinner=False, max_entries=64)
def _scales(path: str, mtime: int):
    from quantlab.scales import Scales

    return Scales.load(path)


def scales(path: str):
    """A scales file, loaded once per modification (treat as read-only)."""
    return _scales(path, _mtime(path))


def read_bytes(path: str) -> Optional[bytes]:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


# -- other engineers' functions -----------------------------------------------------------------------
@st.cache_data(show_spinner="Checking Q/DQ placement...", max_entries=32)
def _check(path: str, mtime: int) -> Dict[str, Any]:
    return export.check_onnx(path)


def check_report(path: str) -> Dict[str, Any]:
    """``quantlab check`` on an ONNX file (cached per file version)."""
    return _check(path, _mtime(path))


@st.cache_data(show_spinner=False)
def tensorrt_info() -> Dict[str, Any]:
    """Whether ``tensorrt`` imports here, its version, the install command and why not."""
    from quantlab.runtimes.tensorrt.loader import import_tensorrt

    info: Dict[str, Any] = {"available": False, "version": None, "install": TENSORRT_INSTALL, "reason": None}
    try:
        trt = import_tensorrt()
        info.update(available=True, version=getattr(trt, "__version__", None))
    except QuantlabError as exc:  # TensorRTUnavailableError, with the install hint
        info["reason"] = str(exc)
    return info


def trtexec_command(onnx_path: str, plan_path: str, sparse: bool = False) -> str:
    """The trtexec command line that builds the same engine; ``sparse`` adds ``--sparsity=enable`` (2:4 sparse kernels)."""
    from quantlab.runtimes.tensorrt.loader import BuildOptions, format_command, trtexec_command as command

    return format_command(command(onnx_path, plan_path, BuildOptions(sparse_weights=sparse)))


def build_engine(run: Dict[str, Any], onnx_path: str, plan_path: str) -> str:
    """Builds the TensorRT engine of a run's ONNX file (a job: recorded on the run)."""
    plan = export.build_engine(store(), run["id"], onnx_path, plan_path)
    clear_caches()
    return str(plan)


@st.cache_data(show_spinner=False, max_entries=16)
def _onnx_sparsity(path: str, mtime: int) -> Dict[str, Any]:
    return export.onnx_sparsity(path)


def onnx_sparsity(path: str) -> Dict[str, Any]:
    """2:4 counts of an exported ONNX file (cached until the file changes)."""
    return _onnx_sparsity(path, _mtime(path))


@st.cache_resource(show_spinner="Loading the run's model and eval data...", max_entries=2)
def _rebuilt(path: str, run_id: str):
    return recorded.rebuild_run(_store(path).get_run(run_id), path)


@st.cache_data(show_spinner=False, max_entries=64)
def _measure_mixed(path: str, run_id: str, calibrator: str, fp16_layers: tuple) -> Dict[str, Any]:
    return autoprecision.measure_mixed(_rebuilt(path, run_id), calibrator, list(fp16_layers))


def measure_mixed(run: Dict[str, Any], calibrator: str, fp16_layers: Sequence[str]) -> Dict[str, Any]:
    """Measures the metric with ``fp16_layers`` in FP16 (cached per run/calibrator/selection)."""
    return _measure_mixed(store_path(), run["id"], calibrator, tuple(sorted(fp16_layers)))


def save_mixed_config(run: Dict[str, Any], calibrator: str, fp16_layers: Sequence[str]) -> str:
    """Writes the scales file without ``fp16_layers`` into the run folder and records it (a job)."""
    path = autoprecision.save_mixed_config(store(), run, scales_files(run)[calibrator], calibrator, list(fp16_layers))
    clear_caches()
    return str(path)


def layers_view(run: Dict[str, Any]) -> pd.DataFrame:
    """Per-layer rows of a run, with sensitivity/rank from its newest sensitivity run per calibrator."""
    frame = summaries.layers_frame(layer_stats(run))
    children = [r for r in runs() if r.get("parent_id") == run["id"] and r["kind"] == "sensitivity" and r["status"] == "done"]
    seen = set()
    rows: List[Dict[str, Any]] = []
    for child in children:  # newest first: the first child per calibrator wins
        child_rows = [r for r in layer_stats(child) if (r.get("calibrator") or "default") not in seen]
        seen.update((r.get("calibrator") or "default") for r in child_rows)
        rows += child_rows
    return summaries.merge_sensitivity(frame, rows)


def sensitivity_runs(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [r for r in runs() if r.get("parent_id") == run["id"] and r["kind"] == "sensitivity"]


def clear_caches() -> None:
    """Forget cached reads (after this session wrote to the store)."""
    _runs.clear()
    # Adding an artifact does not change the run's updated_at (the key), so cached artifact lists
    # must go; the other per-run tables share the loader and are read again too (cheap).
    _run_rows.clear()


def store_is_empty() -> bool:
    """True when the store holds no run (or cannot be read: the pages then show why)."""
    try:
        return not runs()
    except Exception:  # noqa: BLE001 - an unreadable store is reported by the page, not here
        return True


def tensors_with_histograms(run: Dict[str, Any]) -> List[str]:
    """Modules whose input histogram the run's scales files saved (module order)."""
    files = scales_files(run)
    if not files:
        return []
    first = scales(next(iter(files.values())))
    return [e.module for e in first.entries if e.role is Role.INPUT and e.module in first.statistics]


def histogram(run: Dict[str, Any], module: str):
    """``(bins, amax)`` frames for the Layers page: the saved histogram and each calibrator's amax."""
    files = scales_files(run)
    amax_rows = []
    bins = pd.DataFrame(columns=["left", "right", "count"])
    for calibrator, path in files.items():
        sc = scales(path)
        stats = sc.statistics.get(module)
        if stats is None:
            continue
        counts = stats.counts.tolist()
        if bins.empty:
            bins = summaries.histogram_frame(counts, stats.bin_width)
        entry = sc.get(module, "input")
        clipped = summaries.clipped_count(counts, stats.bin_width, float(entry.amax))
        total = int(sum(counts))
        amax_rows.append({"calibrator": calibrator, "amax": float(entry.amax),
                          "clipped": summaries.clipped_fraction(counts, stats.bin_width, float(entry.amax)),
                          "clipped count": clipped, "values": total,
                          "clipped values": summaries.format_clipped(clipped, total),
                          "observed max": float(stats.amax), "scale": float(entry.scale)})
    return bins, pd.DataFrame(amax_rows, columns=["calibrator", "amax", "clipped", "clipped count", "values", "clipped values",
                                                  "observed max", "scale"])


@st.cache_data(show_spinner=False, max_entries=64)
def _layer_info(path: str, mtime: int) -> Dict[str, str]:
    import json

    try:
        info = json.loads(Path(path).read_text(encoding="utf-8")).get("layer_info")
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: no descriptions
        return {}
    if not isinstance(info, dict):
        return {}
    return {str(k): v for k, v in info.items() if isinstance(v, str) and len(v) <= 200}


def layer_info(run: Dict[str, Any]) -> Dict[str, str]:
    """Layer name -> "Conv2d 1→32 3×3" from the run's ``results.json`` ({} for runs recorded before it was kept).

    A sensitivity or export run borrows its parent's descriptions.
    """
    for art in artifacts(run, with_children=False):
        if art["kind"] == "results":
            return _layer_info(art["path"], _mtime(art["path"]))
    parent = run.get("parent_id")
    if parent:
        try:
            return layer_info(store().get_run(parent))
        except QuantlabError:
            return {}
    return {}


def foreign_code(run: Dict[str, Any]) -> List[str]:
    """Why re-running ``run`` would import someone else's Python code ([] if it would not; see quantlab.trust)."""
    from quantlab.jobs.runs import load_run_info
    from quantlab.trust import foreign_reasons

    try:
        info = load_run_info(run.get("run_dir") or run["id"], store_path())
    except Exception:  # noqa: BLE001 - an unreadable folder is reported by the action itself
        return []
    return foreign_reasons(info, run_dir=info.get("run_dir"), store_path=store_path())


def export_now(run: Dict[str, Any], calibrator: str, scales_file: Optional[str] = None) -> Dict[str, Any]:
    """Exports a stored compare run's Q/DQ ONNX for ``calibrator`` (any of the run's, or a saved
    mixed-precision scales file), check report and calibration cache (a child export run)."""
    outcome = export.export_recorded_run(store(), run, calibrator, scales_file=scales_file)
    clear_caches()
    return outcome


def export_choices(run: Dict[str, Any]) -> Dict[str, str]:
    """What the Export page can export as INT8: ``{calibrator or saved mixed config: its scales file}``."""
    choices = {name: path for name, path in scales_files(run).items() if name != "mixed"}
    for art in artifacts(run):
        path = Path(art["path"])
        mixed = art["kind"] == "mixed_scales" or (art["kind"] == "scales" and path.name == "scales.mixed.json")
        if mixed and path.is_file():
            label = path.stem if art["kind"] == "mixed_scales" else f"mixed ({path.parent.name})"
            choices.setdefault(label, str(path))
    return choices


def export_fp16(run: Dict[str, Any]) -> Dict[str, Any]:
    """Exports a stored run's model as FP16 ONNX (a child export run)."""
    outcome = export.export_float_recorded(store(), run, "fp16")
    clear_caches()
    return outcome


@st.cache_data(show_spinner=False, max_entries=256)
def _provenance(path: str, mtime: int) -> Dict[str, Any]:
    return export.artifact_provenance(path)


def provenance(path: str) -> Dict[str, Any]:
    """What a file says about its origin (precision, calibrator, algorithms; {} if nothing)."""
    return _provenance(path, _mtime(path))


def provenance_text(info: Dict[str, Any]) -> str:
    return export.provenance_text(info)


@st.cache_data(show_spinner=False, max_entries=8)
def _zip(paths: tuple, root: Optional[str], mtimes: tuple) -> bytes:
    return export.zip_files(list(paths), root)


def zip_artifacts(paths: Sequence[str], root: Optional[str]) -> bytes:
    """"Download all": the files in one in-memory zip (names relative to the run folder)."""
    return _zip(tuple(paths), root, tuple(_mtime(p) for p in paths))


@st.cache_data(show_spinner=False, max_entries=32)
def _qdq_rows(path: str, mtime: int) -> List[Dict[str, Any]]:
    from quantlab.export.qdq_table import qdq_table

    return [row.to_dict() for row in qdq_table(path)]


def qdq_rows(path: str) -> List[Dict[str, Any]]:
    """Where the Q/DQ nodes of an ONNX file sit (:func:`quantlab.export.qdq_table.qdq_table`), as dicts."""
    return _qdq_rows(path, _mtime(path))


def cache_header_note(algorithm: str, scales_from: Optional[str]) -> str:
    from quantlab.export.cache import header_note

    return header_note(algorithm, scales_from)


def best_calibrator(run: Dict[str, Any]) -> Optional[str]:
    best = summaries.best_int8(results(run))
    return best.get("calibrator") if best else None
