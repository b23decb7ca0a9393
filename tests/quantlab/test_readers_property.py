"""Property: every reader, fed a mutated file, returns or raises a QuantlabError; nothing else, nothing written.

Mutations are structural (a field anywhere set to any JSON value, or removed) and textual
(truncation, inserted bytes); each reader gets a bounded number of examples so this runs in seconds.
"""
import copy
import json
import math
import os
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantlab as ql
from quantlab.errors import QuantlabError
from quantlab.jobs.runs import load_run_info, read_results
from quantlab.export.cache import read_calibration_cache
from quantlab.export.mapping import METADATA_KEY, read_tensor_map, set_metadata
from quantlab.scales import Scales
from quantlab.store import read_manifest
from tests.export.graphs import GraphBuilder

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _containers(doc, path=()):
    """Every (path, container) in a JSON document (containers only: their items get mutated)."""
    out = [(path, doc)] if isinstance(doc, (dict, list)) and doc else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        out += _containers(value, path + (key,))
    return out


@st.composite
def mutated_json(draw, original):
    """Text of ``original`` after one to three mutations (structural or textual)."""
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        places = _containers(doc)
        if not places:
            break
        _, container = draw(st.sampled_from(places))
        key = draw(st.sampled_from(list(container.keys()) if isinstance(container, dict) else list(range(len(container)))))
        if draw(st.booleans()) and isinstance(container, dict):
            del container[key]
        else:
            container[key] = draw(json_values)
    text = json.dumps(doc, allow_nan=True)
    how = draw(st.sampled_from(["as is", "truncate", "insert"]))
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet="[]{}\",:0123456789.eE-tfnNaI ", max_size=8)) + text[at:]
    return text


def _listing(folder: Path):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*"))


def _read_safely(reader, folder: Path):
    before = _listing(folder)
    try:
        reader()
    except QuantlabError:
        pass
    assert _listing(folder) == before, "a reader wrote something"


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    from tests.qat.models import tiny_cnn

    model = tiny_cnn().eval()
    batches = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(b) for b in batches])
    scales = ql.calibrate(model, "max").to_dict()
    for entry in scales["statistics"].values():
        entry["counts"] = entry["counts"][:8]  # keep the mutated documents small
    run = {"run_id": "compare-1", "store": None, "kind": "compare", "model": "tests/qat/models.py:tiny_cnn",
           "data": "fmnist:calib", "eval_data": "fmnist:test[:64]", "metric": "top1",
           "task": {"name": "classification", "params": {}}, "calibrators": ["max"], "precisions": ["fp32", "int8"],
           "eval_batches": 1, "calib_batches": 2, "layer_batches": 1, "batch_size": 64, "calibrator_params": {}}
    results = {"run_id": "compare-1", "metric": "top1", "higher_is_better": True, "best_calibrator": "max",
               "rows": [{"precision": "fp32", "calibrator": None, "source": "ptq", "metric": "top1", "value": 90.0,
                         "delta": 0.0, "seconds": 1.0}, {"precision": "int8", "calibrator": "max", "source": "ptq",
                                                        "metric": "top1", "value": "inf", "delta": "nan", "seconds": None}],
               "scales": {"max": "/r/scales.max.json"}, "statistics": None, "layers": {"max": [{"layer": "fc"}]}}
    qat_run = {"run_id": None, "metric": "top1", "calibrator": "max", "fp32": 90.0, "ptq": 89.0, "qat": None,
               "seconds": {"fp32": 1.0, "ptq": 1.0, "qat": None}, "steps": None, "train_seconds": None,
               "final_loss": None, "world_size": 1, "losses": None}
    manifest = {"format": "quantlab.run-folder", "version": 1, "kind": "compare", "run_id": "x", "store": None,
                "state": "complete", "files": ["run.json"], "committed_at": "t", "owner": {"pid": 1, "host": "h", "start": ""}}
    tensor_map = {"stem.0:input": "input", "fc:input": "/Flatten_output_0", "fc:weight": "fc.weight"}
    return {"scales": scales, "run": run, "results": results, "qat_run": qat_run, "manifest": manifest, "map": tensor_map}


@given(data=st.data())
@SETTINGS
def test_scales_reader(documents, tmp_path, data):
    path = tmp_path / "scales.json"
    path.write_text(data.draw(mutated_json(documents["scales"])))
    _read_safely(lambda: Scales.load(path), tmp_path)


@given(data=st.data())
@SETTINGS
def test_run_folder_readers(documents, tmp_path, data):
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(data.draw(mutated_json(documents["run"])))
    (folder / "results.json").write_text(data.draw(mutated_json(documents["results"])))
    (folder / "quantlab-run.json").write_text(data.draw(mutated_json(documents["manifest"])))
    store = tmp_path / "runs.sqlite"
    _read_safely(lambda: load_run_info(folder, store), tmp_path)
    _read_safely(lambda: read_results(folder), tmp_path)
    _read_safely(lambda: read_manifest(folder), tmp_path)


@given(data=st.data())
@SETTINGS
def test_qat_resume_reader(documents, tmp_path, data):
    from quantlab.qat.run import read_resumable

    folder = tmp_path / "qat"
    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(data.draw(mutated_json(documents["qat_run"])))
    _read_safely(lambda: read_resumable(folder), tmp_path)


@given(lines=st.lists(st.one_of(
    st.sampled_from(["input: 3c008912", "x: 00000000", "y: 7f800000", "z: 7fc00000", "w: 00000001", "a b: 3f800000",
                     "dup: 3c008912", "dup: 3c008912", "bad line", ": 3c", "n: 1234567890"]),
    st.text(alphabet="0123456789abcdef:xyz TR-", max_size=20)), max_size=6),
    header=st.sampled_from(["TRT-8601-EntropyCalibration2", "TRT-x-y", "", "TRT-100300-MinMaxCalibration"]))
@SETTINGS
def test_cache_reader(tmp_path, lines, header):
    path = tmp_path / "calib.cache"
    path.write_text("\n".join([header, *lines]) + "\n")

    def read():
        cache = read_calibration_cache(path)
        assert all(math.isfinite(s) and s > 0 for s in cache.scales.values())  # only usable scales come out

    _read_safely(read, tmp_path)


@given(data=st.data())
@SETTINGS
def test_onnx_metadata_reader(documents, tmp_path, data):
    b = GraphBuilder()
    model = b.model(["input"], [b.conv("input")])
    set_metadata(model, {METADATA_KEY: data.draw(mutated_json(documents["map"]))})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    from quantlab.export.cache import tensor_map_from_onnx
    from quantlab.export.check import check_model

    _read_safely(lambda: read_tensor_map(onnx.load(path)), tmp_path)
    _read_safely(lambda: tensor_map_from_onnx(path, ["conv"]), tmp_path)
    _read_safely(lambda: check_model(path), tmp_path)
