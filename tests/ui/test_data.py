"""The dashboard's cached per-run reads (ui/data.py): one loader, one cache entry per table."""
from __future__ import annotations

from quantlab.store import RunStore
from quantlab.ui import data


def _run_with_every_table(store: RunStore, tmp_path) -> str:
    run_id = store.create_run("compare", model="m")
    store.add_results(run_id, [{"precision": "fp32", "metric": "top1", "value": 91.0},
                               {"precision": "int8", "calibrator": "mse", "metric": "top1", "value": 90.5, "delta": -0.5}])
    store.add_layer_stats(run_id, [{"calibrator": "mse", "layer": "fc", "sqnr_db": 30.0}])
    store.add_fidelity(run_id, [{"precision": "int8", "calibrator": "mse", "n": 10, "max_abs_error": 0.1,
                                 "max_rel_error": 0.2, "mean_cosine": 0.99, "one_minus_cosine": 0.01}])
    store.add_deployment(run_id, [{"precision": "int8", "calibrator": "mse", "runtime": "tensorrt",
                                   "label": "tensorrt", "status": "not installed"}])
    store.add_artifact(run_id, "scales", tmp_path / "scales.mse.json")
    return run_id


def test_each_table_has_its_own_entry_for_the_same_run(empty_store, tmp_path):
    """Same run id and updated_at for every table: the table is part of the cache key, so no read
    returns another table's cached rows."""
    store = RunStore(empty_store)
    run = store.get_run(_run_with_every_table(store, tmp_path))
    for _ in range(2):  # the second round is served from the cache
        assert data.results(run) == store.results(run["id"])
        assert data.layer_stats(run) == store.layer_stats(run["id"])
        assert data.fidelity(run) == store.fidelity(run["id"])
        assert data.deployment(run) == store.deployment(run["id"])
        assert [a["kind"] for a in data.artifacts(run, with_children=False)] == ["scales"]
    assert len({repr(rows) for rows in (data.results(run), data.layer_stats(run), data.fidelity(run), data.deployment(run))}) == 4


def test_an_artifact_added_later_shows_after_clear_caches(empty_store, tmp_path):
    """add_artifact leaves updated_at (the key) as it was: the cached list stays until clear_caches."""
    store = RunStore(empty_store)
    run = store.get_run(_run_with_every_table(store, tmp_path))
    assert len(data.artifacts(run, with_children=False)) == 1
    store.add_artifact(run["id"], "onnx", tmp_path / "int8.onnx")
    assert store.get_run(run["id"])["updated_at"] == run["updated_at"]
    assert len(data.artifacts(run, with_children=False)) == 1  # cached
    data.clear_caches()
    assert [a["kind"] for a in data.artifacts(run, with_children=False)] == ["scales", "onnx"]
