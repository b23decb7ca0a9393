"""Migrating a real version-1 store file to the current schema."""
import json
import os
import sqlite3

from quantlab.store import SCHEMA_VERSION, RunStore
from quantlab.store.schema import MIGRATIONS, SCHEMA_V1


def _write_v1_store(path):
    """A store as quantlab's first schema wrote it (config inline, no delta/seconds/source)."""
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_V1)
    config = json.dumps({"calibrators": ["entropy"], "metric": "top1"}, sort_keys=True)
    conn.execute("INSERT INTO runs (id, kind, model, data, config, run_dir, status, created_at) VALUES "
                 "('compare-1', 'compare', 'examples/fmnist.py:build', 'fmnist:calib', ?, '/tmp/r1', 'done', '2026-01-01T00:00:00+00:00')",
                 (config,))
    conn.execute("INSERT INTO runs (id, kind, model, config, status, created_at) VALUES "
                 "('compare-2', 'compare', 'other', ?, 'failed', '2026-01-02T00:00:00+00:00')", (config,))
    conn.executemany("INSERT INTO results (run_id, precision, calibrator, metric, value) VALUES (?, ?, ?, ?, ?)", [
        ("compare-1", "fp32", None, "top1", 91.5),
        ("compare-1", "int8", "entropy", "top1", 91.0),
        ("compare-1", "int8", "max", "top1", 89.5),
    ])
    conn.execute("INSERT INTO layer_stats (run_id, calibrator, layer, sqnr_db, cosine) VALUES ('compare-1', 'entropy', 'stem.0', 30.0, 0.999)")
    conn.execute("INSERT INTO artifacts (run_id, kind, path) VALUES ('compare-1', 'scales', '/tmp/r1/scales.entropy.json')")
    conn.commit()
    conn.close()


def test_v1_file_migrates_and_keeps_everything(tmp_path):
    path = tmp_path / "runs.sqlite"
    _write_v1_store(path)
    store = RunStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 5
    run = store.get_run("compare-1")
    assert run["config"] == {"calibrators": ["entropy"], "metric": "top1"}
    assert run["status"] == "done" and run["run_dir"] == "/tmp/r1" and run["updated_at"] == run["created_at"]
    results = store.results("compare-1")
    assert [(r["precision"], r["calibrator"], r["value"]) for r in results] == [("fp32", None, 91.5), ("int8", "entropy", 91.0), ("int8", "max", 89.5)]
    assert [r["delta"] for r in results] == [0.0, -0.5, -2.0]  # derived from the FP32 row
    assert all(r["source"] == "ptq" and r["seconds"] is None for r in results)
    assert store.layer_stats("compare-1")[0]["sqnr_db"] == 30.0
    assert store.artifacts("compare-1")[0]["kind"] == "scales"
    assert [r["id"] for r in store.list_runs()] == ["compare-2", "compare-1"]
    with sqlite3.connect(path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        assert "config" not in columns and "config_id" in columns
        assert conn.execute("SELECT COUNT(*) FROM configs").fetchone()[0] == 1  # same config de-duplicated
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3, 4, 5]
    # New rows work on the migrated file, and opening again does not migrate twice.
    new_id = RunStore(path).create_run("sensitivity", model="m", parent_id="compare-1")
    assert RunStore(path).get_run(new_id)["parent_id"] == "compare-1"


def test_v2_file_gains_the_row_sqnr_columns(tmp_path):
    """A store written by schema 2 (before per-row SQNR existed) opens, migrates and keeps its rows."""
    path = tmp_path / "runs.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA_V1)
    conn.execute("BEGIN")
    MIGRATIONS[1](conn)
    conn.execute("INSERT INTO schema_version (version) VALUES (2)")
    conn.execute("INSERT INTO runs (id, kind, model, status, created_at, updated_at) VALUES ('c', 'compare', 'm', 'running', 't', 't')")
    conn.execute("INSERT INTO layer_stats (run_id, calibrator, layer, sqnr_db, cosine, local_sqnr_db, sensitivity, rank) "
                 "VALUES ('c', 'mse', 'fc', 31.0, 0.99, 33.0, 0.5, 1)")
    conn.execute("COMMIT")
    conn.close()
    store = RunStore(path)
    assert store.schema_version() == 5
    (row,) = store.layer_stats("c")
    assert row["local_sqnr_db"] == 33.0 and row["rank"] == 1 and row["row_sqnr_db"] is None and row["local_row_sqnr_db"] is None
    store.add_layer_stats("c", [{"calibrator": "mse", "layer": "fc2", "local_row_sqnr_db": 4.5}])
    assert store.layer_stats("c")[1]["local_row_sqnr_db"] == 4.5


def test_v3_file_gains_owners_and_keeps_its_runs_readable(tmp_path):
    """A store written by schema 3 (no owner columns): rows keep their status; an old "running" row
    has no owner, so its liveness is unknown and it stays running (nothing is guessed)."""
    path = tmp_path / "runs.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA_V1)
    conn.execute("BEGIN")
    MIGRATIONS[1](conn)
    MIGRATIONS[2](conn)
    conn.execute("INSERT INTO schema_version (version) VALUES (2)")
    conn.execute("INSERT INTO schema_version (version) VALUES (3)")
    conn.execute("INSERT INTO runs (id, kind, model, status, created_at, updated_at) VALUES ('old', 'compare', 'm', 'running', 't1', 't1')")
    conn.execute("INSERT INTO runs (id, kind, model, status, created_at, updated_at) VALUES ('fin', 'qat', 'm', 'done', 't0', 't0')")
    conn.execute("COMMIT")
    conn.close()
    store = RunStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 5
    old = store.get_run("old")
    assert old["status"] == old["recorded_status"] == "running" and old["owner"] is None
    assert store.get_run("fin")["status"] == "done"
    assert store.prune_dead_runs() == []  # no owner recorded: never marked interrupted by guess
    with sqlite3.connect(path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    assert {"owner_pid", "owner_host", "owner_start"} <= columns
    # New runs on the migrated file record their owner.
    new_id = store.create_run("compare", model="m")
    assert store.get_run(new_id)["owner"]["pid"] == os.getpid()


def test_v4_file_gains_noise_fidelity_and_deployment(tmp_path):
    """A store written by schema 4 (no noise columns, no fidelity/deployment tables): its rows read back
    with None for the new fields, and the new rows are accepted after the migration."""
    path = tmp_path / "runs.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA_V1)
    conn.execute("BEGIN")
    for version in (1, 2, 3):
        MIGRATIONS[version](conn)
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
    conn.execute("INSERT INTO runs (id, kind, model, status, created_at, updated_at) VALUES ('c', 'compare', 'm', 'running', 't', 't')")
    conn.execute("INSERT INTO results (run_id, precision, calibrator, source, metric, value, delta, seconds) "
                 "VALUES ('c', 'int8', 'mse', 'ptq', 'top1', 90.0, -0.2, 1.5)")
    conn.execute("INSERT INTO layer_stats (run_id, calibrator, layer, sqnr_db, sensitivity, rank) VALUES ('c', 'mse', 'fc', 30.0, 0.1, 1)")
    conn.execute("COMMIT")
    conn.close()
    store = RunStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 5
    (old,) = store.results("c")
    assert old["value"] == 90.0 and old["delta"] == -0.2
    assert all(old[k] is None for k in ("n", "ci_low", "ci_high", "ci_method", "p_value", "paired_test", "within_noise"))
    (layer,) = store.layer_stats("c")
    assert layer["sensitivity"] == 0.1 and layer["sensitivity_p"] is None and layer["sensitivity_within_noise"] is None
    assert store.fidelity("c") == [] and store.deployment("c") == []
    store.add_results("c", [{"precision": "int8", "calibrator": "max", "metric": "top1", "value": 89.0, "n": 100,
                             "ci_low": 81.0, "ci_high": 94.0, "ci_method": "Wilson 95%", "p_value": 0.5,
                             "paired_test": "McNemar exact (paired, vs FP32)", "within_noise": True}])
    new = store.results("c")[1]
    assert new["n"] == 100 and new["within_noise"] is True and new["p_value"] == 0.5
    store.add_fidelity("c", [{"precision": "int8", "calibrator": "max", "n": 100, "top1_agreement": 97.0,
                              "max_abs_error": 0.5, "max_rel_error": 2.0, "mean_cosine": 0.999, "one_minus_cosine": 0.001,
                              "kl_divergence": 1e-4}])
    assert store.fidelity("c")[0]["top1_agreement"] == 97.0
    store.add_deployment("c", [{"precision": "int8", "calibrator": "max", "source": "ptq", "runtime": "onnxruntime-cpu",
                                "label": "onnxruntime-cpu u8s8, 2 threads", "status": "measured", "batch_size": 1,
                                "latency_ms_min": 0.1, "latency_ms_median": 0.2, "warmup": 3, "repeats": 10, "size_mb": 0.01,
                                "onnx_file": "int8.max.onnx", "onnx_sha256": "ab" * 32}])
    assert store.deployment("c")[0]["latency_ms_median"] == 0.2
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3, 4, 5]


def test_new_rows_are_validated_before_anything_is_written(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run("compare", model="m")
    import pytest

    from quantlab.store import StoreError

    with pytest.raises(StoreError, match="within_noise"):
        store.add_results(run_id, [{"precision": "fp32", "metric": "top1", "value": 1.0, "within_noise": "yes"}])
    with pytest.raises(StoreError, match="n"):
        store.add_fidelity(run_id, [{"precision": "fp16", "max_abs_error": 0.1}])
    with pytest.raises(StoreError, match="measured row needs"):
        store.add_deployment(run_id, [{"precision": "fp32", "runtime": "onnxruntime-cpu", "label": "x", "status": "measured"}])
    with pytest.raises(StoreError, match="status"):
        store.add_deployment(run_id, [{"precision": "fp32", "runtime": "tensorrt", "label": "x", "status": "fast"}])
    assert store.results(run_id) == [] and store.fidelity(run_id) == [] and store.deployment(run_id) == []
