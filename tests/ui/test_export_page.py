"""The Export page exports any choice: INT8 of a non-default calibrator, FP16, a saved mixed-precision
configuration; says where each file came from; "Download all" is a zip of valid files."""
import dataclasses
import io
import json
import zipfile
from pathlib import Path

import onnx
import pytest

from quantlab.store import RunStore
from tests.ui.helpers import no_exceptions, open_page


@pytest.fixture
def plain_run(empty_store, tmp_path):
    """A real run with two calibrators and nothing exported yet (no sensitivity, no export stage)."""
    from quantlab.jobs.demo import run_demo
    from quantlab.jobs.demo_spec import demo_spec, validate

    store = RunStore(empty_store)
    spec = validate(dataclasses.replace(demo_spec(str(tmp_path / "plain"), eval_samples=64, calib_samples=64),
                                        calibrators=["max", "percentile"], precisions=["fp32", "int8"],
                                        sensitivity=False, export=False))
    outcome = run_demo(store, spec)
    return store, outcome


def _frame(at, column):
    """The page's table that has ``column``."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def _metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _children(store, run_id, kind="export"):
    return [r for r in store.list_runs(kind) if r["parent_id"] == run_id]


def test_export_a_non_default_calibrator_and_fp16_then_download_all(plain_run):
    from quantlab.jobs.export import zip_files

    store, outcome = plain_run
    run_id, best = outcome["run_id"], outcome["best_calibrator"]
    other = next(c for c in ("max", "percentile") if c != best)
    at = open_page("export")
    no_exceptions(at)
    assert at.selectbox(key="export-now-cal").value == best  # the default is the run's best

    at.selectbox(key="export-now-cal").set_value(other).run()
    at.button(key="export-now").click().run(timeout=120)
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    (child,) = _children(store, run_id)
    kinds = {a["kind"]: Path(a["path"]) for a in store.artifacts(child["id"])}
    onnx_path = kinds["onnx"]
    assert onnx_path.parent.name == f"export.{other}"
    meta = _metadata(onnx_path)
    assert meta["quantlab.calibrator"] == other and meta["quantlab.precision"] == "int8"
    assert json.loads(meta["quantlab.algorithms"]) == [] and meta["quantlab.source_run"] == run_id
    # The cache's metadata names the calibrator and explains the EntropyCalibration2 header.
    cache_meta = json.loads(Path(f"{kinds['calibration_cache']}.json").read_text())
    assert cache_meta["scales_from"]["calibrator"] == other
    assert cache_meta["header_algorithm"] == "EntropyCalibration2"
    assert "does not say how the scales were chosen" in cache_meta["note"] and other in cache_meta["note"]
    # The page says where each file came from: the table's "from" column and the cache caption.
    files = _frame(at, "from").set_index("file")
    assert files.loc[f"export.{other}/model.int8.onnx", "from"] == f"INT8 · calibrator {other} · algorithms: none"
    assert files.loc[f"export.{other}/calibration.cache", "from"].startswith(f"INT8 · calibrator {other}")
    assert any("does not say how the scales were chosen" in c.value and f"{other} calibrator" in c.value for c in at.caption)

    at.button(key="export-fp16").click().run(timeout=120)
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    fp16_child = next(r for r in _children(store, run_id) if r["id"] != child["id"])
    (fp16,) = [Path(a["path"]) for a in store.artifacts(fp16_child["id"]) if a["kind"] == "onnx_fp16"]
    model = onnx.load(str(fp16))
    onnx.checker.check_model(model, full_check=True)
    assert _metadata(fp16)["quantlab.precision"] == "fp16"
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    files = _frame(at, "from").set_index("file")
    assert files.loc["model.fp16.onnx", "from"] == "FP16"

    # The Q/DQ table of the selected INT8 model lists every Q/DQ node.
    at.selectbox(key="export-onnx").set_value(str(onnx_path)).run()
    qdq = _frame(at, "quantizes")
    graph = onnx.load(str(onnx_path)).graph
    assert len(qdq) == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node) > 0

    # "Download all": the page's button, and the plain function behind it gives a zip of every file.
    assert any("Download all" in str(b.proto.label) for b in at.get("download_button"))
    paths = [a["path"] for r in [store.get_run(run_id)] + _children(store, run_id) for a in store.artifacts(r["id"])]
    archive = zipfile.ZipFile(io.BytesIO(zip_files(paths, outcome["run_dir"])))
    names = set(archive.namelist())
    assert {f"export.{other}/model.int8.onnx", f"export.{other}/calibration.cache", f"export.{other}/check.md",
            "model.fp16.onnx", "scales.max.json", "scales.percentile.json", "results.json"} <= names
    for name in names:
        if name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load_from_string(archive.read(name)), full_check=True)
    assert archive.read("scales.max.json") == (Path(outcome["run_dir"]) / "scales.max.json").read_bytes()


def test_a_saved_mixed_precision_config_exports_with_its_float_layers(plain_run):
    from quantlab.jobs.autoprecision import save_mixed_config

    store, outcome = plain_run
    run = store.get_run(outcome["run_id"])
    scales_path = Path(outcome["run_dir"]) / "scales.max.json"
    saved = save_mixed_config(store, run, str(scales_path), "max", ["stem.0"])
    at = open_page("export")
    no_exceptions(at)
    files = _frame(at, "from").set_index("file")
    assert files.loc[saved.name, "what"] == "mixed-precision scales"
    assert files.loc[saved.name, "from"] == "INT8 + FP16 (mixed) · calibrator max · algorithms: none · 1 layer(s) in float"
    at.selectbox(key="export-now-cal").set_value(saved.stem).run()
    at.button(key="export-now").click().run(timeout=120)
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    child = _children(store, outcome["run_id"])[0]
    onnx_path = next(Path(a["path"]) for a in store.artifacts(child["id"]) if a["kind"] == "onnx")
    meta = _metadata(onnx_path)
    assert meta["quantlab.calibrator"] == "max" and json.loads(meta["quantlab.float_layers"]) == ["stem.0"]
    # The layer kept in float has no Q/DQ: its conv reads the float input.
    from quantlab.export.qdq_table import qdq_table

    assert not [r for r in qdq_table(onnx_path) if r.layer.startswith("stem.0:")]
