"""The run store: every command's runs, configs, metrics, per-layer stats and artifacts.

    from quantlab.store import RunStore
    store = RunStore()          # $QUANTLAB_STORE, else ./.quantlab/runs.sqlite
    run_id = store.create_run("compare", model="examples/fmnist.py:build", config={...}, run_dir="runs/fmnist")
    store.add_results(run_id, [{"precision": "fp32", "calibrator": None, "source": "ptq",
                                "metric": "top1", "value": 91.2, "delta": 0.0, "seconds": 1.3}])
    store.set_status(run_id, "done")
"""
from quantlab.store.errors import RunNotFoundError, StoreError, StoreFormatError
from quantlab.store.runstore import (
    PRECISIONS,
    RUN_KINDS,
    SOURCES,
    STATUSES,
    STORE_ENV,
    RunStore,
    default_store_path,
)
from quantlab.store.schema import SCHEMA_VERSION

__all__ = [
    "RunStore",
    "RunNotFoundError",
    "StoreError",
    "StoreFormatError",
    "default_store_path",
    "SCHEMA_VERSION",
    "STORE_ENV",
    "RUN_KINDS",
    "STATUSES",
    "PRECISIONS",
    "SOURCES",
]
