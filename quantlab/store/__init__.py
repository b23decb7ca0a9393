"""The run store: every command's runs, configs, metrics, per-layer stats and artifacts.

    from quantlab.store import RunStore
    store = RunStore()          # $QUANTLAB_STORE, else ./.quantlab/runs.sqlite
    run_id = store.create_run("compare", model="examples/fmnist.py:build", config={...}, run_dir="runs/fmnist")
    store.add_results(run_id, [{"precision": "fp32", "calibrator": None, "source": "ptq",
                                "metric": "top1", "value": 91.2, "delta": 0.0, "seconds": 1.3}])
    store.set_status(run_id, "done")
"""
from quantlab.store.errors import RunFinishedError, RunNotFoundError, StoreError, StoreFormatError
from quantlab.store.lock import RunLock, RunLockedError
from quantlab.store.owner import ProcessOwner
from quantlab.store.runfolder import MANIFEST_FILE, RunFolder, RunFolderStateError, read_manifest
from quantlab.store.runstore import (
    FINAL_STATUSES,
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
    "FINAL_STATUSES",
    "MANIFEST_FILE",
    "ProcessOwner",
    "RunFinishedError",
    "RunFolder",
    "RunFolderStateError",
    "RunLock",
    "RunLockedError",
    "read_manifest",
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
