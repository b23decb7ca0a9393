"""The ONE writer of the run store: every job records its run through a :class:`Recorder`.

    recorder = Recorder(store)                  # None or False: record nothing (same calls, no writes)
    with recorder.run(description) as run:      # a RunDescription; creates the run (status running)
        run.results(rows); run.layer_stats(rows); run.artifact("scales", path)
        run.progress(0.5, "int8 entropy")
    # normal exit: "done"; an exception: "failed" with its one-line message (and it propagates);
    # Ctrl-C / SIGTERM / SIGHUP (a KeyboardInterrupt): "interrupted".

Child runs (a sensitivity run started from a compare run) are descriptions with
``parent_id``: the same recorder records them, nested or not. A run created before
its work starts (the dashboard records a job, then a worker process runs it) is made
with :meth:`Recorder.create`, then adopted with ``recorder.run(description, run_id=...)``.

Nothing outside :mod:`quantlab.store` and this module calls the store's write
methods (tests/quantlab/test_architecture.py checks it), so what a run's record
means is decided here, once:

* :meth:`Recorder._create` / :meth:`Recorder._adopt`: where a run gets (or takes
  over, :meth:`RunStore.claim <quantlab.store.RunStore.claim>`) its owner process,
  so that readers show a run whose process died as ``interrupted``;
* :func:`outcome`: the status and message an exception means (SIGTERM/SIGHUP unwind
  as an interruption while a run is recorded, see :mod:`quantlab.interrupts`);
* :meth:`Recorder._finish`: the one final status write of every run (a finished
  record is never rewritten: the store refuses it);
* :meth:`Recorder.prune`: ``interrupted`` recorded for runs whose owner is gone.

A job that writes a run folder holds the folder's lock from before its work
(:func:`quantlab.jobs.folders.open_run_folder`) and commits the folder as a whole
before the run's artifacts are recorded, so a recorded artifact is always there.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Tuple, Union

from quantlab.errors import QuantlabError
from quantlab.interrupts import Terminated, terminate_as_interrupt
from quantlab.jobs.description import RunDescription
from quantlab.jobs.errors import RecorderError

PathLike = Union[str, "os.PathLike[str]"]
MAX_ERROR_CHARS = 2000


def one_line(exc: BaseException) -> str:
    """An exception as the one line a user reads (a quantlab error is its message; others name their type)."""
    text = str(exc) if isinstance(exc, QuantlabError) else f"{type(exc).__name__}: {exc}"
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def outcome(exc: BaseException, *, interrupted_hint: Optional[str] = None) -> Tuple[str, str]:
    """``(status, message)`` that ``exc`` ends a run with.

    A ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM/SIGHUP turned into a
    :class:`~quantlab.interrupts.Terminated`) is ``interrupted``; its message says
    "interrupted", the signal if any, plus ``interrupted_hint`` (e.g. how to resume).
    Anything else is ``failed`` with the exception's one line.
    """
    if isinstance(exc, KeyboardInterrupt):
        detail = str(exc).strip()
        message = "interrupted" + (f" ({detail})" if detail else "") + (f" ({interrupted_hint})" if interrupted_hint else "")
        return "interrupted", message
    return "failed", one_line(exc)


class RecordedRun:
    """The handle of one run being recorded (see :meth:`Recorder.run`).

    Attributes:
        run_id: The run's id (None when nothing is recorded).
        description: What the run is.
        stage: The last stage given to :meth:`progress` (the store keeps only the fraction).
        fraction: The last progress fraction.
    """

    def __init__(self, recorder: "Recorder", description: RunDescription, run_id: Optional[str], *, owns_status: bool = True) -> None:
        self._recorder = recorder
        self.description = description
        self.run_id = run_id
        self.stage: Optional[str] = None
        self.fraction = 0.0
        self._owns_status = owns_status  # False for a report: the run it annotates keeps its own status
        self._failure: Optional[str] = None

    @property
    def recording(self) -> bool:
        """Whether anything is written (a store was given)."""
        return self.run_id is not None

    @property
    def store_path(self) -> Optional[Path]:
        """The store file the run is recorded in (None when nothing is recorded)."""
        return self._recorder.store.path if self.recording else None

    def _rows_allowed(self, what: str) -> None:
        if not self._owns_status:
            raise RecorderError(f"a {self.description.kind.value} records files on run {self.run_id}, not {what}")

    def results(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds metric rows (see :meth:`quantlab.store.RunStore.add_results`)."""
        self._rows_allowed("result rows")
        rows = [dict(r) for r in rows]
        if self.recording and rows:
            self._recorder.store.add_results(self.run_id, rows)

    def layer_stats(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds per-layer rows (see :meth:`quantlab.store.RunStore.add_layer_stats`)."""
        self._rows_allowed("per-layer rows")
        rows = [dict(r) for r in rows]
        if self.recording and rows:
            self._recorder.store.add_layer_stats(self.run_id, rows)

    def fidelity(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds output-fidelity rows (see :meth:`quantlab.store.RunStore.add_fidelity`)."""
        self._rows_allowed("fidelity rows")
        rows = [dict(r) for r in rows]
        if self.recording and rows:
            self._recorder.store.add_fidelity(self.run_id, rows)

    def deployment(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Adds deployment-cost rows (see :meth:`quantlab.store.RunStore.add_deployment`)."""
        self._rows_allowed("deployment rows")
        rows = [dict(r) for r in rows]
        if self.recording and rows:
            self._recorder.store.add_deployment(self.run_id, rows)

    def artifact(self, kind: str, path: PathLike) -> None:
        """Records a file the run wrote (scales, onnx, report, checkpoint, ...)."""
        if self.recording:
            self._recorder.store.add_artifact(self.run_id, kind, path)

    def progress(self, fraction: float, stage: Optional[str] = None) -> None:
        """Records progress (0..1, clamped) while the run is running; ``stage`` is kept on the handle."""
        self.fraction = min(1.0, max(0.0, float(fraction)))
        if stage is not None:
            self.stage = stage
        if self.recording and self._owns_status:
            self._recorder.store.set_status(self.run_id, "running", progress=self.fraction)

    def fail(self, message: str) -> None:
        """Ends the run ``failed`` with ``message`` when the block exits normally (a job whose
        result says it failed, e.g. an export whose check found errors, without raising)."""
        self._failure = message


class Recorder:
    """Records job runs in a run store (see the module docstring).

    Args:
        store: A :class:`quantlab.store.RunStore`, or the path of one (opened, and
            created, only when the first run is recorded: a job refused before it
            records leaves no store file behind); None or False records nothing.
    """

    def __init__(self, store: Any = None) -> None:
        self._store = None if store is None or store is False else store

    def __repr__(self) -> str:
        return f"Recorder({self._store!r})"

    @property
    def store(self) -> Any:
        """The run store (opened on first use when given as a path), or None."""
        if isinstance(self._store, (str, os.PathLike)):
            from quantlab.store import RunStore

            self._store = RunStore(self._store)
        return self._store

    @property
    def recording(self) -> bool:
        return self._store is not None

    # -- the places a run's record is decided -------------------------------------------------------
    def _create(self, description: RunDescription) -> str:
        """A new record, status ``running``, owned by this process (the store records pid, host and start)."""
        return self.store.create_run(
            description.store_kind,
            model=description.model,
            data=description.data,
            eval_data=description.eval_data,
            config=description.config_dict(),
            run_dir=description.run_dir,
            parent_id=description.parent_id,
            name=description.name,
        )

    def _adopt(self, run_id: str) -> str:
        """Takes over a run recorded before its work started (a dashboard job's worker): this process
        becomes its owner, progress from 0.

        Raises:
            RunNotFoundError: no such run.
            RunFinishedError: the run already ended (a finished record is never taken over).
        """
        self.store.get_run(run_id)  # RunNotFoundError names the id
        self.store.claim(run_id)  # if this process dies, readers see the run interrupted
        self.store.set_status(run_id, "running", progress=0.0)
        return run_id

    def _finish(self, run_id: str, status: str, error: Optional[str] = None) -> None:
        """The final status write of a run (``done`` also sets progress 1)."""
        self.store.set_status(run_id, status, error=error)

    # -- the API ------------------------------------------------------------------------------------
    def create(self, description: RunDescription) -> Optional[str]:
        """Records a run before its work starts (status ``running``); a worker then adopts it
        with ``run(description, run_id=...)``. Returns its id (None when not recording)."""
        if not self.recording:
            return None
        if description.store_kind is None:
            raise RecorderError(f"a {description.kind.value} has no record of its own to create")
        return self._create(description)

    def knows(self, run_id: Optional[str]) -> bool:
        """Whether ``run_id`` is a run in the store (False when not recording)."""
        if not self.recording or not run_id:
            return False
        from quantlab.store import RunNotFoundError

        try:
            self.store.get_run(run_id)
        except RunNotFoundError:
            return False
        return True

    def fail(self, run_id: Optional[str], error: Union[str, BaseException]) -> None:
        """Marks a created run failed before any work ran (its worker could not start)."""
        if self.recording and run_id is not None:
            self._finish(run_id, "failed", error if isinstance(error, str) else one_line(error))

    def attach(self, run_id: Optional[str], kind: str, path: PathLike) -> None:
        """Records a file made later for an already recorded run (an engine, mixed-precision scales);
        the run's status is left as it is."""
        if self.recording and run_id is not None:
            self.store.add_artifact(run_id, kind, path)

    def prune(self, *, dry_run: bool = False) -> list:
        """Records ``interrupted`` for every running run whose owner process is gone (``quantlab runs --prune``).

        Returns:
            The runs concerned (recorded or, with ``dry_run``, only listed).
        """
        if not self.recording:
            return []
        return self.store.prune_dead_runs(dry_run=dry_run)

    @contextlib.contextmanager
    def run(
        self,
        description: RunDescription,
        *,
        run_id: Optional[str] = None,
        interrupted_hint: Optional[str] = None,
    ) -> Iterator[RecordedRun]:
        """Records one run around the block (see the module docstring).

        Args:
            description: What runs. A kind without a record of its own (a report) records
                its artifacts on ``description.parent_id`` and leaves that run's status alone.
            run_id: Adopt this already recorded run instead of creating one.
            interrupted_hint: Added to the message of an interrupted run (e.g. how to resume).

        Yields:
            The run's :class:`RecordedRun` (``run_id`` None when not recording).

        Raises:
            Whatever the block raised, after recording the outcome (a failure to record
            the outcome never hides the block's own error).
        """
        if not isinstance(description, RunDescription):
            raise RecorderError(f"recorder.run needs a RunDescription, got {type(description).__name__}")
        annotation = description.store_kind is None
        if not self.recording:
            handle = RecordedRun(self, description, None, owns_status=not annotation)
        elif annotation:
            handle = RecordedRun(self, description, description.parent_id, owns_status=False)
        else:
            handle = RecordedRun(self, description, self._adopt(run_id) if run_id is not None else self._create(description))
        try:
            with terminate_as_interrupt(only_default=True) if handle.recording and handle._owns_status else contextlib.nullcontext():
                yield handle
        except BaseException as exc:
            if handle.recording and handle._owns_status:
                status, message = outcome(exc, interrupted_hint=interrupted_hint)
                try:
                    self._finish(handle.run_id, status, message)
                except Exception:  # noqa: BLE001 - the job's own error is the one the user needs to see
                    pass
            raise
        if handle.recording and handle._owns_status:
            if handle._failure is not None:
                self._finish(handle.run_id, "failed", handle._failure)
            else:
                self._finish(handle.run_id, "done")


def optional_store(path: Optional[PathLike] = None, *, env: bool = True) -> Optional[PathLike]:
    """The store path ``path``, else ``$QUANTLAB_STORE`` when ``env`` and it is set, else None (record nothing).

    For commands that record only when asked (``quantlab export``, ``quantlab run``); a
    :class:`Recorder` opens it only when the job records its run.
    """
    from quantlab.store import STORE_ENV

    return path or (os.environ.get(STORE_ENV) if env else None) or None


__all__ = ["Recorder", "RecordedRun", "Terminated", "one_line", "optional_store", "outcome"]
