"""RunStore: runs, configs, metrics, per-layer statistics and artifact paths in SQLite.

Safe for several processes at once (a CLI run writing while the dashboard
reads): the database is in WAL mode, so readers never block the writer and
always see whole transactions; every write is one ``BEGIN IMMEDIATE``
transaction, validated completely before anything is inserted; a writer that
finds the database locked waits up to ``busy_timeout`` seconds.

Each call opens its own short-lived connection, so one RunStore object may be
shared between threads (Streamlit) and nothing stays locked between calls.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
import math
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Union

from quantlab.store.errors import RunFinishedError, RunNotFoundError, StoreError, StoreFormatError
from quantlab.store.owner import ProcessOwner
from quantlab.store.schema import MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION, config_hash, run_script

STORE_ENV = "QUANTLAB_STORE"
DEFAULT_RELATIVE_PATH = Path(".quantlab") / "runs.sqlite"
SQLITE_MAGIC = b"SQLite format 3\x00"

RUN_KINDS = ("calibrate", "compare", "sensitivity", "autoprecision", "qat", "export")
STATUSES = ("running", "done", "failed", "interrupted")
#: A run's record is final once it leaves ``running``: no command rewrites it.
FINAL_STATUSES = ("done", "failed", "interrupted")
PRECISIONS = ("fp32", "fp16", "int8")
SOURCES = ("ptq", "qat", "mixed", "sparse", "sparse-qat")  # sparse: 2:4 + INT8 (quantlab.sparsity)
#: PTQ with algorithms, one row per prefix of the pipeline (quantlab.algorithms): "ptq+cle+bias-correction".
ALGORITHM_SOURCE = re.compile(r"ptq(\+[a-z0-9][a-z0-9_.-]{0,63}){1,16}")

_RESULT_KEYS = {"precision", "calibrator", "source", "metric", "value", "delta", "seconds"}
_LAYER_KEYS = {
    "calibrator", "layer", "sqnr_db", "cosine", "sensitivity", "rank", "local_sqnr_db", "local_cosine",
    "row_sqnr_db", "local_row_sqnr_db",
}
_LAYER_NUMBERS = ("sqnr_db", "cosine", "local_sqnr_db", "local_cosine", "row_sqnr_db", "local_row_sqnr_db", "sensitivity")
_RUN_COLUMNS = (
    "id, kind, name, model, data, eval_data, config_id, run_dir, parent_id, status, progress, error, created_at, updated_at, "
    "owner_pid, owner_host, owner_start"
)

PathLike = Union[str, "os.PathLike[str]"]


def default_store_path() -> Path:
    """``$QUANTLAB_STORE``, else ``./.quantlab/runs.sqlite`` in the current folder."""
    env = os.environ.get(STORE_ENV)
    return Path(env).expanduser() if env else Path.cwd() / DEFAULT_RELATIVE_PATH


def _now() -> str:
    # Microseconds keep creation order when several runs start within one second.
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _number(value: Any, what: str, *, allow_none: bool = True, allow_inf: bool = True) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise StoreError(f"{what} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise StoreError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number) or (not allow_inf and math.isinf(number)):
        raise StoreError(f"{what} must be a finite number, got {number}")
    return number


class RunStore:
    """The run store (see the module docstring).

    Args:
        path: The SQLite file; default :func:`default_store_path`. Created (with
            its folder) if missing; migrated if it has an older schema.
        busy_timeout: Seconds a write waits for another writer's lock.

    Raises:
        StoreFormatError: the file exists but is not SQLite, is a different
            SQLite database, or was written by a newer quantlab.
    """

    def __init__(self, path: Optional[PathLike] = None, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path).expanduser().resolve() if path is not None else default_store_path().resolve()
        self.busy_timeout = float(busy_timeout)
        self._check_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # -- connections ------------------------------------------------------------------------------
    def _check_file(self) -> None:
        if self.path.is_dir():
            raise StoreFormatError(f"run store {self.path} is a folder, not an SQLite file")
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
        if head != SQLITE_MAGIC:
            raise StoreFormatError(
                f"run store {self.path} is not an SQLite database (it does not start with the SQLite header); "
                f"point --store or ${STORE_ENV} at a quantlab runs.sqlite file or a new path"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open run store {self.path}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn
        except sqlite3.DatabaseError as exc:
            raise self._translate(exc) from None
        finally:
            conn.close()

    def _translate(self, exc: sqlite3.DatabaseError) -> StoreError:
        text = str(exc)
        if "not a database" in text or "malformed" in text:
            return StoreFormatError(f"run store {self.path} is not a valid SQLite database ({text})")
        if "locked" in text or "busy" in text:
            return StoreError(f"run store {self.path} stayed locked by another writer for {self.busy_timeout:g} s ({text})")
        return StoreError(f"run store {self.path}: {text}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all or nothing."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- schema -----------------------------------------------------------------------------------
    @staticmethod
    def _tables(conn: sqlite3.Connection) -> set:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}

    def _version(self, conn: sqlite3.Connection) -> Optional[int]:
        """The schema version, None for an empty database; raises for a foreign one."""
        tables = self._tables(conn)
        if not tables:
            return None
        if "schema_version" not in tables:
            raise StoreFormatError(
                f"{self.path} is an SQLite database but not a quantlab run store "
                f"(no schema_version table; tables: {', '.join(sorted(tables)[:10])})"
            )
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if row is None or row[0] is None:
            raise StoreFormatError(f"run store {self.path} has an empty schema_version table")
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreFormatError(
                f"run store {self.path} has schema version {version}, newer than this quantlab understands "
                f"({SCHEMA_VERSION}); upgrade quantlab or use another --store"
            )
        return version

    def _ensure_schema(self) -> None:
        with self._connect() as conn:
            if self._version(conn) == SCHEMA_VERSION:
                return  # the common case: no lock taken
            conn.execute("PRAGMA journal_mode = WAL")  # persistent; set once, outside any transaction
        with self._write() as conn:
            version = self._version(conn)  # again under the lock: another process may have migrated
            if version is None:
                run_script(conn, SCHEMA_V1)
                version = 1
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def schema_version(self) -> int:
        """The store's schema version (always :data:`SCHEMA_VERSION` after opening)."""
        with self._connect() as conn:
            return int(self._version(conn) or 0)

    # -- runs -------------------------------------------------------------------------------------
    def create_run(
        self,
        kind: str,
        *,
        model: str,
        data: Optional[str] = None,
        eval_data: Optional[str] = None,
        config: Optional[Mapping[str, Any]] = None,
        run_dir: Optional[PathLike] = None,
        parent_id: Optional[str] = None,
        name: Optional[str] = None,
        owner: Optional[ProcessOwner] = None,
    ) -> str:
        """Records a new run (status ``running``, owned by ``owner``: default this process) and returns its id.

        Raises:
            StoreError: unknown kind, empty model, config not JSON-serializable.
            RunNotFoundError: ``parent_id`` is not in the store.
        """
        if kind not in RUN_KINDS:
            raise StoreError(f"unknown run kind {kind!r}; expected one of {', '.join(RUN_KINDS)}")
        if not isinstance(model, str) or not model:
            raise StoreError("create_run needs a model description (a non-empty string)")
        config_text = None
        if config is not None:
            if not isinstance(config, Mapping):
                raise StoreError(f"run config must be a dict, got {type(config).__name__}")
            try:
                config_text = json.dumps(dict(config), sort_keys=True, allow_nan=True)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"run config is not JSON-serializable: {exc}") from None
        now = _now()
        run_id = f"{kind}-{now[:19].replace('-', '').replace(':', '').replace('T', '-')}-{secrets.token_hex(3)}"
        with self._write() as conn:
            if parent_id is not None:
                self._require_run(conn, parent_id)
            config_id = None
            if config_text is not None:
                digest = config_hash(config_text)
                conn.execute("INSERT OR IGNORE INTO configs (sha256, json) VALUES (?, ?)", (digest, config_text))
                config_id = conn.execute("SELECT id FROM configs WHERE sha256 = ?", (digest,)).fetchone()[0]
            owner = owner or ProcessOwner.current()
            conn.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', 0.0, NULL, ?, ?, ?, ?, ?)",
                (
                    run_id, kind, name, model, data, eval_data, config_id,
                    str(Path(run_dir).resolve()) if run_dir is not None else None,
                    parent_id, now, now, owner.pid, owner.host, owner.start,
                ),
            )
        return run_id

    def _require_run(self, conn: sqlite3.Connection, run_id: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise RunNotFoundError(f"run '{run_id}' is not in the run store {self.path} (see `quantlab runs`)")

    def _require_running(self, conn: sqlite3.Connection, run_id: str, doing: str) -> str:
        """The run's recorded status; raises unless it is ``running`` (a finished record is final)."""
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            self._require_run(conn, run_id)
        if row["status"] != "running":
            raise RunFinishedError(
                f"run '{run_id}' is already {row['status']}: a finished run's record is never rewritten ({doing} refused); "
                "start a new run instead"
            )
        return row["status"]

    def set_status(self, run_id: str, status: str, *, error: Optional[str] = None, progress: Optional[float] = None) -> None:
        """Updates a running run's status, error text and progress (0..1).

        Transitions: ``running`` -> ``running`` (progress), ``done``, ``failed``
        or ``interrupted``. A finished run is never rewritten: setting the status
        it already has is a no-op, anything else raises.

        Raises:
            RunFinishedError: the run is already done/failed/interrupted (with another status).
            RunNotFoundError: unknown ``run_id``.
        """
        if status not in STATUSES:
            raise StoreError(f"unknown run status {status!r}; expected one of {', '.join(STATUSES)}")
        if progress is not None:
            progress = _number(progress, "progress", allow_inf=False)
            if not 0.0 <= progress <= 1.0:
                raise StoreError(f"progress must be within 0..1, got {progress}")
        elif status == "done":
            progress = 1.0
        with self._write() as conn:
            row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                self._require_run(conn, run_id)
            if row["status"] != "running":
                if row["status"] == status:
                    return  # already recorded (e.g. two layers both reporting a failure): keep the first record
                self._require_running(conn, run_id, f"setting it {status}")
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, progress = COALESCE(?, progress), updated_at = ? WHERE id = ?",
                (status, error, progress, _now(), run_id),
            )

    def claim(self, run_id: str, owner: Optional[ProcessOwner] = None) -> None:
        """Makes ``owner`` (default: this process) the owner of a running run (a worker taking over its job).

        Raises:
            RunFinishedError: the run is not running any more.
        """
        owner = owner or ProcessOwner.current()
        with self._write() as conn:
            self._require_running(conn, run_id, "claiming it")
            conn.execute("UPDATE runs SET owner_pid = ?, owner_host = ?, owner_start = ?, updated_at = ? WHERE id = ?",
                         (owner.pid, owner.host, owner.start, _now(), run_id))

    def prune_dead_runs(self, *, dry_run: bool = False) -> List[Dict[str, Any]]:
        """Records ``interrupted`` for every running run whose owner process is gone (on this host).

        Returns:
            The runs concerned (as :meth:`get_run` gives them), whether or not ``dry_run``.
        """
        with self._connect() as conn:
            rows = conn.execute(self._run_select("WHERE runs.status = 'running'")).fetchall()
        dead = [r for r in (self._run_dict(row) for row in rows) if r["status"] == "interrupted"]
        if not dry_run:
            for run in dead:
                owner = run["owner"] or {}
                message = f"owner process pid {owner.get('pid')} on {owner.get('host')} ended without recording an outcome"
                with contextlib.suppress(RunFinishedError):  # finished meanwhile
                    self.set_status(run["id"], "interrupted", error=message)
        return dead

    def get_run(self, run_id: str) -> Dict[str, Any]:
        """The run as a dict (``config`` parsed back from JSON).

        Raises:
            RunNotFoundError: naming the id.
        """
        with self._connect() as conn:
            row = conn.execute(self._run_select("WHERE runs.id = ?"), (run_id,)).fetchone()
            if row is None:
                self._require_run(conn, run_id)
        return self._run_dict(row)

    def list_runs(self, kind: Optional[str] = None, *, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Runs, newest first, optionally of one kind."""
        where, params = ("WHERE runs.kind = ?", [kind]) if kind else ("", [])
        sql = self._run_select(where) + " ORDER BY runs.created_at DESC, runs.rowid DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [self._run_dict(r) for r in rows]

    def find_run(self, ref: PathLike) -> Dict[str, Any]:
        """A run by id, or the newest run recorded with ``ref`` as its run folder.

        Raises:
            RunNotFoundError: naming ``ref``.
        """
        ref_text = str(ref)
        with self._connect() as conn:
            row = conn.execute(self._run_select("WHERE runs.id = ?"), (ref_text,)).fetchone()
            if row is None:
                row = conn.execute(
                    self._run_select("WHERE runs.run_dir = ?") + " ORDER BY runs.created_at DESC LIMIT 1",
                    (str(Path(ref_text).expanduser().resolve()),),
                ).fetchone()
        if row is None:
            raise RunNotFoundError(f"no run with id or run folder '{ref_text}' in the run store {self.path} (see `quantlab runs`)")
        return self._run_dict(row)

    @staticmethod
    def _run_select(where: str) -> str:
        cols = ", ".join(f"runs.{c.strip()}" for c in _RUN_COLUMNS.split(","))
        return f"SELECT {cols}, configs.json AS config FROM runs LEFT JOIN configs ON configs.id = runs.config_id {where}"

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> Dict[str, Any]:
        """A run row as a dict; ``status`` is what is TRUE now: a ``running`` run whose owner
        process is provably gone reads ``interrupted`` (``recorded_status`` keeps the row's value)."""
        out = dict(row)
        out.pop("config_id", None)
        try:
            out["config"] = json.loads(out["config"]) if out.get("config") else None
        except ValueError:
            out["config"] = None  # a hand-edited row: the run stays listable
        pid, host, start = out.pop("owner_pid", None), out.pop("owner_host", None), out.pop("owner_start", None)
        owner = ProcessOwner.from_dict({"pid": pid, "host": host, "start": start or ""})
        out["owner"] = owner.to_dict() if owner is not None else None
        out["recorded_status"] = out["status"]
        if out["status"] == "running" and owner is not None and owner.alive() is False:
            out["status"] = "interrupted"
            out["error"] = out.get("error") or f"its process ({owner.describe()}) ended without recording an outcome"
        return out

    # -- results ----------------------------------------------------------------------------------
    def add_results(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds metric rows (all or none).

        Each row: ``precision`` ("fp32" | "fp16" | "int8"), ``calibrator`` (str or
        None), ``source`` ("ptq" | "qat" | "mixed", default "ptq"), ``metric``,
        ``value``, ``delta`` (vs FP32, or None), ``seconds`` (or None).

        Raises:
            StoreError: a row is invalid (the message names the row); nothing is added.
            RunNotFoundError: unknown ``run_id``.
        """
        values = []
        for i, row in enumerate(rows):
            where = f"result row {i}"
            unknown = set(row) - _RESULT_KEYS
            if unknown:
                raise StoreError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_RESULT_KEYS)}")
            precision = row.get("precision")
            if precision not in PRECISIONS:
                raise StoreError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
            source = row.get("source") or "ptq"
            if source not in SOURCES and not (isinstance(source, str) and ALGORITHM_SOURCE.fullmatch(source)):
                raise StoreError(f"{where}: source must be one of {', '.join(SOURCES)}, got {source!r}")
            metric = row.get("metric")
            if not isinstance(metric, str) or not metric:
                raise StoreError(f"{where}: metric must be a non-empty string, got {metric!r}")
            calibrator = row.get("calibrator")
            if calibrator is not None and not isinstance(calibrator, str):
                raise StoreError(f"{where}: calibrator must be a string or None, got {calibrator!r}")
            values.append(
                (
                    run_id, precision, calibrator, source, metric,
                    _number(row.get("value"), f"{where} ({metric}) value", allow_none=False),
                    _number(row.get("delta"), f"{where} ({metric}) delta"),
                    _number(row.get("seconds"), f"{where} seconds", allow_inf=False),
                )
            )
        with self._write() as conn:
            self._require_running(conn, run_id, "adding results")
            conn.executemany(
                "INSERT INTO results (run_id, precision, calibrator, source, metric, value, delta, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (_now(), run_id))

    def results(self, run_id: str) -> List[Dict[str, Any]]:
        """The run's metric rows in insertion order."""
        return self._rows(
            run_id, "SELECT precision, calibrator, source, metric, value, delta, seconds FROM results WHERE run_id = ? ORDER BY id"
        )

    def add_layer_stats(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds per-layer rows (all or none).

        Each row: ``calibrator``, ``layer``, ``sqnr_db``, ``cosine``, ``sensitivity``
        (None ok), ``rank`` (None ok); optionally ``local_sqnr_db`` and
        ``local_cosine`` (the layer quantized alone, on FP32 inputs) and
        ``row_sqnr_db`` / ``local_row_sqnr_db`` (mean per-row SQNR, see
        :mod:`quantlab.evaluation.layers`).
        """
        values = []
        for i, row in enumerate(rows):
            where = f"layer row {i}"
            unknown = set(row) - _LAYER_KEYS
            if unknown:
                raise StoreError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_LAYER_KEYS)}")
            layer = row.get("layer")
            if not isinstance(layer, str):
                raise StoreError(f"{where}: layer must be a string (module name), got {layer!r}")
            rank = row.get("rank")
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise StoreError(f"{where} ('{layer}'): rank must be an integer or None, got {rank!r}")
            numbers = tuple(_number(row.get(key), f"{where} ('{layer}') {key}") for key in _LAYER_NUMBERS)
            values.append((run_id, row.get("calibrator"), layer) + numbers + (rank,))
        columns = ", ".join(("run_id", "calibrator", "layer") + _LAYER_NUMBERS + ("rank",))
        with self._write() as conn:
            self._require_running(conn, run_id, "adding per-layer rows")
            conn.executemany(
                f"INSERT INTO layer_stats ({columns}) VALUES ({', '.join('?' * (len(_LAYER_NUMBERS) + 4))})",
                values,
            )
            conn.execute("UPDATE runs SET updated_at = ? WHERE id = ?", (_now(), run_id))

    def layer_stats(self, run_id: str) -> List[Dict[str, Any]]:
        """The run's per-layer rows in insertion order."""
        return self._rows(
            run_id,
            "SELECT calibrator, layer, sqnr_db, cosine, local_sqnr_db, local_cosine, row_sqnr_db, local_row_sqnr_db, "
            "sensitivity, rank FROM layer_stats WHERE run_id = ? ORDER BY id",
        )

    def add_artifact(self, run_id: str, kind: str, path: PathLike) -> None:
        """Records an artifact file (scales, onnx, report, histograms, checkpoint, ...) of a run."""
        if not isinstance(kind, str) or not kind:
            raise StoreError("artifact kind must be a non-empty string")
        with self._write() as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO artifacts (run_id, kind, path, created_at) VALUES (?, ?, ?, ?)",
                (run_id, kind, str(Path(path).resolve()), _now()),
            )

    def artifacts(self, run_id: str) -> List[Dict[str, Any]]:
        """The run's artifacts (kind, path, created_at) in insertion order."""
        return self._rows(run_id, "SELECT kind, path, created_at FROM artifacts WHERE run_id = ? ORDER BY id")

    def delete_run(self, run_id: str) -> None:
        """Removes a run and its rows (artifact files are left on disk)."""
        with self._write() as conn:
            self._require_run(conn, run_id)
            for table in ("results", "layer_stats", "artifacts"):
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def _rows(self, run_id: str, sql: str) -> List[Dict[str, Any]]:
        with self._connect() as conn:
            rows = conn.execute(sql, (run_id,)).fetchall()
            if not rows:
                self._require_run(conn, run_id)
        return [dict(r) for r in rows]
