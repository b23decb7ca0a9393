"""Run folders of the jobs: checked and locked before the work, committed as a whole after it.

The one way a job (compare, qat, autoprecision, the demo job) or ``quantlab
calibrate`` writes its run folder:

    with open_run_folder(out, kind="compare", inputs={"--model": "net.py:build"}) as folder:  # before any work
        ...                                                          # the work
        paths = commit_files(folder, write, run=run)                 # write(stage) -> {name: staged path}
        run.artifact("results", paths["results"])                    # recorded once the files are there

The folder itself (lock, staging, manifest, the atomic swap) is
:class:`quantlab.store.RunFolder`; this module decides when jobs use it: the
output is checked and the lock taken before any work (a second writer, or a
folder quantlab did not write, is refused before anything is loaded or
recorded), the files are staged and swapped in together (a kill leaves the
previous folder or the new one, never a mix), and a run's artifacts are
recorded after the commit (what the store names exists).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
#: Files of a dashboard job (written by its worker beside the run's own files) that a commit keeps.
JOB_FILES = ("job.json", "job.log")

Write = Callable[[Path], Optional[Mapping[str, PathLike]]]


class _OpenHere:
    def __repr__(self) -> str:
        return "OPEN_HERE"


#: Default of a job's ``folder`` argument where None has a meaning of its own (QAT: no folder on
#: this rank): the job opens its run folder itself, before anything is recorded.
OPEN_HERE: Any = _OpenHere()


def check_run_folder(path: PathLike, *, inputs: Optional[Dict[str, Any]] = None) -> None:
    """Refuses ``path`` as a run folder before any work (what :func:`open_run_folder` checks, without the lock).

    Raises:
        OutputPathError: see :func:`open_run_folder`.
    """
    from quantlab.store.runfolder import check_replaceable

    check_replaceable(path, inputs=inputs)


def open_run_folder(path: PathLike, *, kind: str, inputs: Optional[Dict[str, Any]] = None, keep: Iterable[str] = (),
                    purpose: Optional[str] = None) -> Any:
    """Checks ``path`` and takes its lock, before any work; returns the open :class:`quantlab.store.RunFolder`.

    Args:
        path: The run folder (created on the first commit).
        kind: The job (recorded in the folder's manifest).
        inputs: ``{label: path}`` of the job's inputs: none may lie inside the folder
            (a commit replaces it as a whole).
        keep: Files of the current folder a commit keeps (a dashboard job's ``job.json``/``job.log``).
        purpose: What a refused second writer is told holds the folder (default ``quantlab <kind>``).

    Raises:
        OutputPathError: ``path`` is a file, a folder quantlab did not write, holds an input, or is not writable.
        RunLockedError: another writer holds the folder.
    """
    from quantlab.store.runfolder import RunFolder

    return RunFolder(path, kind=kind, inputs=inputs, keep=tuple(keep), purpose=purpose or f"quantlab {kind}")


def open_on_main_rank(path: PathLike, *, main: bool, kind: str, inputs: Optional[Dict[str, Any]] = None,
                      purpose: Optional[str] = None) -> Any:
    """:func:`open_run_folder` on rank 0 only (it alone writes the folder); a refusal is raised on every rank.

    Returns:
        The folder on rank 0, None on the other ranks.
    """
    from quantlab import distributed

    folder, error = None, None
    if main:
        try:
            folder = open_run_folder(path, kind=kind, inputs=inputs, purpose=purpose)
        except Exception as exc:  # noqa: BLE001 - raised on every rank just below
            error = exc
    distributed.raise_if_any_rank_failed(error, "opening the run folder")
    return folder


def lock_run_folder(path: PathLike, purpose: str) -> Any:
    """The lock of a committed run folder, for a job that adds one file to it (sensitivity) or
    writes one output file beside its lock (export); a context manager.

    Raises:
        RunLockedError: another writer holds it.
    """
    from quantlab.store.lock import RunLock

    return RunLock(path, purpose)


def commit_files(folder: Any, write: Write, *, run: Any = None, state: str = "complete", base: str = "new") -> Dict[str, Path]:
    """Stages what ``write(stage)`` writes and commits the folder as a whole; returns the files' final paths.

    Args:
        folder: The open :class:`quantlab.store.RunFolder`.
        write: Writes the files into the staging folder it is given; returns ``{name: path}``
            of those to report (mapped to where they are once committed).
        run: The :class:`~quantlab.jobs.recorder.RecordedRun`, whose id and store go into the manifest.
        state: The manifest's state (``complete``; QAT: ``training``, then ``done``).
        base: ``"new"`` (an empty stage: the folder is replaced) or ``"current"`` (the committed
            files, hard-linked: the run adds to its folder).
    """
    if run is not None and run.run_id is not None:
        folder.run_id = run.run_id
        folder.store = str(run.store_path) if run.store_path is not None else None
    stage = folder.stage(base=base)
    staged = write(stage) or {}
    final = {name: folder.final(Path(path)) for name, path in staged.items()}
    folder.commit(state=state)
    return final


def relative_inputs(folder: PathLike, pattern: str = "*.json", what: str = "the run's") -> Dict[str, Path]:
    """``{label: path}`` of a run folder's files (inputs of a job that writes beside or inside it)."""
    folder = Path(folder)
    return {f"{what} {p.name}": p for p in folder.glob(pattern)} if folder.is_dir() else {}


__all__ = ["JOB_FILES", "OPEN_HERE", "check_run_folder", "lock_run_folder", "commit_files", "open_on_main_rank", "open_run_folder", "relative_inputs"]
