"""RunStore round trip and bad input, on a real SQLite file."""
import hashlib
import math
import sqlite3

import pytest

from quantlab.errors import QuantlabError
from quantlab.store import SCHEMA_VERSION, RunNotFoundError, RunStore, StoreError, StoreFormatError


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    config = {"calibrators": ["max", "entropy"], "eval_batches": 3, "nested": {"x": [1, 2]}}
    run_id = store.create_run("compare", model="examples/fmnist.py:build", data="fmnist:calib", eval_data="fmnist:test",
                              config=config, run_dir=tmp_path / "run", name="demo")
    child = store.create_run("autoprecision", model="m", parent_id=run_id)
    rows = [
        {"precision": "fp32", "calibrator": None, "source": "ptq", "metric": "top1", "value": 91.5, "delta": 0.0, "seconds": 1.25},
        {"precision": "int8", "calibrator": "entropy", "source": "ptq", "metric": "top1", "value": 91.0, "delta": -0.5, "seconds": 2.0},
        {"precision": "int8", "calibrator": "max", "metric": "perplexity", "value": math.inf, "delta": None, "seconds": None},
    ]
    store.add_results(run_id, rows)
    store.add_layer_stats(run_id, [{"calibrator": "entropy", "layer": "stem.0", "sqnr_db": 31.5, "cosine": 0.9995,
                                    "sensitivity": 0.2, "rank": 1, "local_sqnr_db": 35.0}])
    store.add_artifact(run_id, "scales", tmp_path / "run" / "scales.entropy.json")
    store.set_status(run_id, "running", progress=0.5)
    assert store.get_run(run_id)["progress"] == 0.5
    store.set_status(run_id, "done")

    reopened = RunStore(tmp_path / "runs.sqlite")
    run = reopened.get_run(run_id)
    assert run["kind"] == "compare" and run["status"] == "done" and run["progress"] == 1.0
    assert run["config"] == config and run["name"] == "demo" and run["eval_data"] == "fmnist:test"
    assert run["run_dir"] == str((tmp_path / "run").resolve())
    assert reopened.get_run(child)["parent_id"] == run_id
    got = reopened.results(run_id)
    assert [r["value"] for r in got] == [91.5, 91.0, math.inf]
    assert got[2]["source"] == "ptq" and got[1]["delta"] == -0.5
    layers = reopened.layer_stats(run_id)
    assert layers[0]["layer"] == "stem.0" and layers[0]["rank"] == 1 and layers[0]["local_cosine"] is None
    assert reopened.artifacts(run_id)[0]["path"].endswith("scales.entropy.json")
    assert [r["id"] for r in reopened.list_runs()] == [child, run_id]
    assert [r["id"] for r in reopened.list_runs("compare")] == [run_id]
    assert reopened.find_run(tmp_path / "run")["id"] == run_id
    assert reopened.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "runs.sqlite") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM configs").fetchone()[0] == 1


def test_default_path_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "env" / "store.sqlite"))
    assert RunStore().path == (tmp_path / "env" / "store.sqlite").resolve()
    monkeypatch.delenv("QUANTLAB_STORE")
    monkeypatch.chdir(tmp_path)
    assert RunStore().path == (tmp_path / ".quantlab" / "runs.sqlite").resolve()


def test_file_that_is_not_sqlite_is_named_and_left_alone(tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("this is a text file, not a database\n" * 20)
    before = _digest(bogus)
    with pytest.raises(StoreFormatError, match="notes.sqlite.*not an SQLite database"):
        RunStore(bogus)
    assert _digest(bogus) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sqlite"]


def test_foreign_sqlite_database_is_rejected(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    conn.close()
    with pytest.raises(StoreFormatError, match="other.db.*not a quantlab run store"):
        RunStore(other)


def test_newer_schema_is_rejected(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    conn.close()
    with pytest.raises(StoreFormatError, match="schema version 99"):
        RunStore(path)


def test_missing_run_id_is_named_and_store_unchanged(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run("compare", model="m")
    snapshot = (store.list_runs(), store.results(run_id) if store.results(run_id) else [])
    for call in (
        lambda: store.get_run("compare-19990101-000000-abcdef"),
        lambda: store.results("compare-19990101-000000-abcdef"),
        lambda: store.add_results("compare-19990101-000000-abcdef", [{"precision": "fp32", "metric": "top1", "value": 1.0}]),
        lambda: store.add_layer_stats("compare-19990101-000000-abcdef", [{"layer": "a"}]),
        lambda: store.add_artifact("compare-19990101-000000-abcdef", "scales", "x.json"),
        lambda: store.set_status("compare-19990101-000000-abcdef", "done"),
        lambda: store.create_run("autoprecision", model="m", parent_id="compare-19990101-000000-abcdef"),
    ):
        with pytest.raises(RunNotFoundError, match="compare-19990101-000000-abcdef") as info:
            call()
        assert isinstance(info.value, QuantlabError)
    assert (store.list_runs(), []) == snapshot
    with pytest.raises(RunNotFoundError, match="runs/nowhere"):
        store.find_run("runs/nowhere")


def test_invalid_rows_add_nothing(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run("compare", model="m")
    good = {"precision": "fp32", "metric": "top1", "value": 90.0}
    bad_rows = [
        [good, {"precision": "int4", "metric": "top1", "value": 1.0}],
        [good, {"precision": "int8", "metric": "top1", "value": float("nan")}],
        [good, {"precision": "int8", "metric": "top1", "value": "high"}],
        [good, {"precision": "int8", "metric": "top1", "value": 1.0, "colour": "red"}],
        [good, {"precision": "int8", "source": "magic", "metric": "top1", "value": 1.0}],
    ]
    for rows in bad_rows:
        with pytest.raises(StoreError, match="result row 1"):
            store.add_results(run_id, rows)
    with pytest.raises(StoreError, match="rank"):
        store.add_layer_stats(run_id, [{"layer": "a", "rank": 1}, {"layer": "b", "rank": "first"}])
    with pytest.raises(StoreError, match="unknown run kind"):
        store.create_run("train", model="m")
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.create_run("compare", model="m", config={"x": object()})
    with pytest.raises(StoreError, match="progress"):
        store.set_status(run_id, "running", progress=2.0)
    assert store.results(run_id) == [] and store.layer_stats(run_id) == []
    assert len(store.list_runs()) == 1 and store.get_run(run_id)["status"] == "running"
