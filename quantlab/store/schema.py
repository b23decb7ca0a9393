"""The run store's SQLite schema, its versions and the migrations between them.

A new store is created at version 1 and migrated forward, so the migration path
is the only path and runs on every fresh store (it cannot rot).

Version history:
    1. runs (config JSON inline), results (precision, calibrator, metric, value),
       layer_stats (sqnr_db, cosine), artifacts.
    2. configs table (JSON de-duplicated by SHA-256, ``runs.config_id``);
       runs gain name, eval_data, parent_id, progress, error, updated_at;
       results gain source, delta (vs FP32), seconds; layer_stats gain
       local_sqnr_db, local_cosine, sensitivity, rank; artifacts gain created_at;
       indexes for the dashboard's queries.
    3. layer_stats gain row_sqnr_db and local_row_sqnr_db: the mean over rows
       (tokens / samples) of each row's SQNR, which exposes layers whose
       per-tensor range is set by a few huge outliers (global SQNR hides them).
    4. runs gain owner_pid, owner_host, owner_start: the process that writes the
       run, so readers show a ``running`` run whose owner died as ``interrupted``
       (older rows have no owner: their liveness is unknown and they keep their
       status). The status ``interrupted`` is new (a TEXT column: no change).
    5. What INT8 buys and costs (issue 17). results gain n, ci_low, ci_high,
       ci_method (the 95% interval), p_value, paired_test, within_noise (the
       paired test against FP32 on the same samples); layer_stats gain
       sensitivity_n, sensitivity_p, sensitivity_within_noise (the same test for
       a layer's recovery); new tables ``fidelity`` (output comparison against
       FP32 per configuration) and ``deployment`` (latency per batch and size of
       the exported file, per runtime, with its source label and SHA-256).
"""
from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from typing import Callable, Dict, Mapping, Optional, Sequence

SCHEMA_VERSION = 5

SCHEMA_V1 = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    data TEXT,
    config TEXT,
    run_dir TEXT,
    status TEXT NOT NULL DEFAULT 'running',
    created_at TEXT NOT NULL
);
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    precision TEXT NOT NULL,
    calibrator TEXT,
    metric TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE TABLE layer_stats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    calibrator TEXT,
    layer TEXT NOT NULL,
    sqnr_db REAL,
    cosine REAL
);
CREATE TABLE artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL
);
INSERT INTO schema_version (version) VALUES (1);
"""

def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Executes ``;``-separated statements one by one.

    ``Connection.executescript`` would COMMIT first, breaking the caller's
    transaction; statements here never contain a ``;`` of their own.
    """
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Migration:
    """One step of the schema: what version ``v + 1`` adds to version ``v``.

    Calling it applies the step on ``conn`` (inside the caller's transaction): first
    ``creates`` (new tables and indexes), then ``columns`` (each added with
    ``ALTER TABLE ... ADD COLUMN``), then ``data`` (rows moved or derived, once the
    new columns exist).

    Attributes:
        columns: Table -> the column definitions it gains (``"name TYPE ..."``), in order.
        creates: ``;``-separated CREATE TABLE / CREATE INDEX statements.
        data: Rewrites rows for the new schema (None: nothing to move).
    """

    columns: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    creates: str = ""
    data: Optional[Callable[[sqlite3.Connection], None]] = None

    def __call__(self, conn: sqlite3.Connection) -> None:
        run_script(conn, self.creates)
        for table, definitions in self.columns.items():
            for definition in definitions:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {definition}")
        if self.data is not None:
            self.data(conn)


def _move_v1_data(conn: sqlite3.Connection) -> None:
    """Version 2's data step: configs out of the runs, ``updated_at`` and ``delta`` filled in."""
    # Version 1 kept the config JSON inline in each run: move it to the configs table.
    for run_id, text in conn.execute("SELECT id, config FROM runs WHERE config IS NOT NULL").fetchall():
        digest = config_hash(text)
        conn.execute("INSERT OR IGNORE INTO configs (sha256, json) VALUES (?, ?)", (digest, text))
        conn.execute("UPDATE runs SET config_id = (SELECT id FROM configs WHERE sha256 = ?) WHERE id = ?", (digest, run_id))
    conn.execute("ALTER TABLE runs DROP COLUMN config")
    conn.execute("UPDATE runs SET updated_at = created_at")
    # Version 1 had no delta column: derive it from the FP32 row of the same run and metric.
    conn.execute(
        """
        UPDATE results SET delta = value - (
            SELECT f.value FROM results AS f
            WHERE f.run_id = results.run_id AND f.metric = results.metric AND f.precision = 'fp32'
            ORDER BY f.id LIMIT 1)
        """
    )


_V2 = Migration(
    columns={
        "runs": ("name TEXT", "eval_data TEXT", "config_id INTEGER REFERENCES configs(id)", "parent_id TEXT",
                 "progress REAL", "error TEXT", "updated_at TEXT"),
        "results": ("source TEXT NOT NULL DEFAULT 'ptq'", "delta REAL", "seconds REAL"),
        "layer_stats": ("local_sqnr_db REAL", "local_cosine REAL", "sensitivity REAL", "rank INTEGER"),
        "artifacts": ("created_at TEXT",),
    },
    creates="""
        CREATE TABLE configs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            sha256 TEXT NOT NULL UNIQUE,
            json TEXT NOT NULL
        );
        CREATE INDEX idx_runs_kind_created ON runs(kind, created_at);
        CREATE INDEX idx_runs_run_dir ON runs(run_dir);
        CREATE INDEX idx_results_run ON results(run_id);
        CREATE INDEX idx_layer_stats_run ON layer_stats(run_id);
        CREATE INDEX idx_artifacts_run ON artifacts(run_id);
        """,
    data=_move_v1_data,
)

_V3 = Migration(columns={"layer_stats": ("row_sqnr_db REAL", "local_row_sqnr_db REAL")})

_V4 = Migration(columns={"runs": ("owner_pid INTEGER", "owner_host TEXT", "owner_start TEXT")})

_V5 = Migration(
    columns={
        "results": ("n INTEGER", "ci_low REAL", "ci_high REAL", "ci_method TEXT", "p_value REAL", "paired_test TEXT",
                    "within_noise INTEGER"),
        "layer_stats": ("sensitivity_n INTEGER", "sensitivity_p REAL", "sensitivity_within_noise INTEGER"),
    },
    creates="""
        CREATE TABLE fidelity (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            precision TEXT NOT NULL,
            calibrator TEXT,
            source TEXT NOT NULL DEFAULT 'ptq',
            n INTEGER NOT NULL,
            top1_agreement REAL,
            max_abs_error REAL,
            max_rel_error REAL,
            mean_cosine REAL,
            one_minus_cosine REAL,
            kl_divergence REAL
        );
        CREATE TABLE deployment (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            precision TEXT NOT NULL,
            calibrator TEXT,
            source TEXT NOT NULL DEFAULT 'ptq',
            runtime TEXT NOT NULL,
            label TEXT NOT NULL,
            status TEXT NOT NULL,
            batch_size INTEGER,
            latency_ms_min REAL,
            latency_ms_median REAL,
            warmup INTEGER,
            repeats INTEGER,
            size_mb REAL,
            onnx_file TEXT,
            onnx_sha256 TEXT,
            note TEXT
        );
        CREATE INDEX idx_fidelity_run ON fidelity(run_id);
        CREATE INDEX idx_deployment_run ON deployment(run_id)
        """,
)

#: ``MIGRATIONS[v]`` upgrades a store from version ``v`` to ``v + 1`` inside one transaction.
MIGRATIONS: Dict[int, Migration] = {1: _V2, 2: _V3, 3: _V4, 4: _V5}

assert all(v in MIGRATIONS for v in range(1, SCHEMA_VERSION)), "a migration is missing"
