"""Run folders written as a whole: staged beside the folder, then swapped in with one rename.

    with RunFolder("runs/a", kind="calibrate") as folder:     # lock taken, --out checked: before any work
        ...                                                  # the work
        stage = folder.stage()                               # .a.staging-<pid>-<hex>/ beside runs/a
        scales.save(stage / "scales.max.json")
        folder.commit()                                      # quantlab-run.json written, then swapped in

What a reader of ``runs/a`` can see is therefore always a whole folder: the
previous one or the new one, never a mix, whatever moment the writer is killed
at (SIGKILL included). The swap is ``renameat2(RENAME_EXCHANGE)`` (Linux, one
atomic step); elsewhere two renames, and a writer that finds the folder missing
but its ``.old`` sibling present puts it back before anything else.

* One writer at a time: :class:`~quantlab.store.lock.RunLock` (released by the
  kernel if the process dies).
* ``quantlab-run.json`` (the manifest, written last inside the stage) records
  kind, run id, state, files, owner and commit time; :func:`read_manifest`
  validates it.
* A folder that exists but is not a quantlab run folder (a project folder given
  as ``--out`` by mistake) is refused, never replaced: :func:`check_replaceable`.
* Staging and ``.old`` leftovers of killed writers are removed by the next
  writer (it holds the lock, so nobody else is writing).

``base="current"`` starts a stage from the committed folder (files hard-linked,
so it costs no copy): for a run that adds to its folder (QAT's final files
beside its checkpoint). Writers must replace files (atomic writes), never
modify them in place: a hard-linked file is shared with the committed folder.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from quantlab.errors import OutputPathError
from quantlab.store.errors import StoreError
from quantlab.store.lock import RunLock
from quantlab.store.owner import ProcessOwner

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST_FILE = "quantlab-run.json"
FORMAT_NAME = "quantlab.run-folder"
FORMAT_VERSION = 1
#: Files quantlab has always written into run folders: a folder of only such files (and no
#: manifest: written by an older quantlab) may be replaced; anything else is the user's.
MARKER_FILES = ("run.json", "results.json", "calibration.json", "qat.json", "job.json", "job.log", "mixed.json")
ARTIFACT_SUFFIXES = (".json", ".log", ".pt", ".onnx", ".html", ".md", ".cache", ".plan", ".engine", ".txt")
ARTIFACT_DIRS = ("autoprecision.",)


class RunFolderStateError(StoreError):
    """A run folder is in a state the requested operation does not allow (e.g. resuming a finished run)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


# -- reading ------------------------------------------------------------------------------------------
def read_manifest(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The folder's validated manifest, or None if it has none (absent, or written by an older quantlab).

    Raises:
        RunFolderStateError: the manifest exists but is not valid.
    """
    from quantlab.validation import Fields, read_json_file

    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    data = read_json_file(path, what="run folder manifest", error=RunFolderStateError, max_bytes=16 << 20)
    f = Fields(data, str(path), RunFolderStateError)
    if data.get("format") != FORMAT_NAME:
        raise RunFolderStateError(f"{path}: not a quantlab run folder manifest")
    f.integer("version", required=True, nullable=False, low=1, high=FORMAT_VERSION)
    f.string("kind", max_len=64)
    f.string("run_id", max_len=200)
    f.string("state", required=True, nullable=False, max_len=64)
    f.string("committed_at", max_len=64)
    f.string("store", max_len=4096)
    f.strings("files")
    f.obj("owner")
    return data


def is_quantlab_folder(folder: PathLike) -> bool:
    """A folder quantlab wrote: it has a manifest, or only files quantlab writes and one of its marker files."""
    folder = Path(folder)
    if (folder / MANIFEST_FILE).is_file():
        return True
    # Hidden entries are locks and stages of sub-folders (autoprecision.<c>) or the OS's own files.
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if not any(e.name in MARKER_FILES for e in entries):
        return False
    for entry in entries:
        if entry.is_dir():
            if not entry.name.startswith(ARTIFACT_DIRS):
                return False
        elif entry.suffix not in ARTIFACT_SUFFIXES:
            return False
    return True


def check_replaceable(folder: PathLike, *, label: str = "--out", inputs: Optional[Dict[str, Any]] = None) -> None:
    """Refuses (before any work) a folder output that would destroy something that is not a quantlab run.

    Allowed: a missing path (created), an empty folder, a quantlab run folder
    (replaced as a whole on commit) that holds none of the command's ``inputs``.

    Raises:
        OutputPathError: a file, a non-empty folder quantlab did not write, an
            input inside the folder, an unwritable parent.
    """
    folder = Path(folder)
    real = Path(os.path.realpath(folder))
    for name, source in (inputs or {}).items():
        if source is None or str(source) == "":
            continue
        where = Path(os.path.realpath(source))
        if where == real or where.is_relative_to(real):
            raise OutputPathError(f"{label} {folder} holds {name} {source}: the run folder is replaced as a whole, "
                                  f"which would destroy that input; give another {label}")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{label} {folder} is a file; a run folder is expected there")
    if folder.is_dir():
        if any(folder.iterdir()) and not is_quantlab_folder(folder):
            shown = ", ".join(sorted(p.name for p in folder.iterdir())[:6])
            raise OutputPathError(
                f"{label} {folder} is a folder quantlab did not write (it holds {shown}); a run folder is replaced "
                "as a whole, so give a new or empty folder"
            )
    from quantlab.outputs import check_parent_writable

    check_parent_writable(folder, label)


# -- the swap -----------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_into_place(stage: Path, target: Path) -> None:
    """Puts the folder ``stage`` at ``target`` in one step; the previous ``target`` is removed."""
    if not target.exists():
        os.rename(stage, target)
    elif _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # now holds the previous folder
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
        os.rename(target, old)  # a kill between these two renames is repaired by recover()
        os.rename(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def _siblings(target: Path, tag: str) -> List[Path]:
    prefix = f".{target.name}.{tag}-"
    try:
        return [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return []


def recover(target: PathLike) -> None:
    """Undoes what a killed writer left beside ``target`` (call with its lock held)."""
    target = Path(target)
    olds = sorted(_siblings(target, "old"), key=lambda p: p.stat().st_mtime)
    if olds and not target.exists():
        os.rename(olds.pop(), target)  # killed between the two renames of the fallback swap
    for leftover in olds + _siblings(target, "staging"):
        shutil.rmtree(leftover, ignore_errors=True)


def _link_tree(source: Path, dest: Path, skip: Sequence[str] = ()) -> None:
    """Hard-links every file of ``source`` into ``dest`` (copies where links are refused)."""
    dest.mkdir(exist_ok=True)
    for entry in source.iterdir():
        if entry.name in skip:
            continue
        to = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            _link_tree(entry, to)
        else:
            try:
                os.link(entry, to, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, to, follow_symlinks=False)


def _files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


# -- writing ------------------------------------------------------------------------------------------
class RunFolder:
    """The one writer of a run folder (see the module docstring).

    Args:
        path: The run folder.
        kind: Run kind ("calibrate", "compare", "qat", ...), recorded in the manifest.
        run_id: The run's id in the store, if recorded.
        store: The store file, if recorded.
        keep: Names of files of the current folder carried into a ``base="new"``
            commit (a dashboard job's ``job.json``/``job.log``).
        purpose: Shown to a refused second writer.
        replace: Allow replacing an existing quantlab run folder (False: it must
            be absent or empty: for commands whose runs must not be overwritten).
        inputs: ``{label: path}`` of the command's inputs: none may lie in the folder.

    Raises:
        OutputPathError: ``path`` is not a place a run folder may be written.
        RunLockedError: another writer holds the folder.
    """

    def __init__(self, path: PathLike, *, kind: str, run_id: Optional[str] = None, store: Optional[PathLike] = None,
                 keep: Iterable[str] = (), purpose: str = "", replace: bool = True,
                 inputs: Optional[Dict[str, Any]] = None) -> None:
        self.path = Path(os.path.abspath(path))
        self.kind = kind
        self.run_id = run_id
        self.store = str(store) if store is not None else None
        self.keep = tuple(keep)
        check_replaceable(self.path, inputs=inputs)
        if not replace and self.path.is_dir() and any(self.path.iterdir()):
            raise OutputPathError(f"--out {self.path} already holds a run; give a new folder")
        self.lock = RunLock(self.path, purpose or f"quantlab {kind}")
        self._stage: Optional[Path] = None
        try:
            recover(self.path)
        except BaseException:
            self.lock.release()
            raise

    # -- staging --------------------------------------------------------------------------------------
    def stage(self, *, base: str = "new") -> Path:
        """The staging folder of the next commit (created on first call).

        Args:
            base: ``"new"`` (empty) or ``"current"`` (the committed files, hard-linked).
        """
        if not self.lock.held:
            raise StoreError(f"run folder {self.path}: the writer was closed")
        if self._stage is None:
            stage = self.path.parent / f".{self.path.name}.staging-{os.getpid()}-{secrets.token_hex(3)}"
            if base == "current" and self.path.is_dir():
                _link_tree(self.path, stage, skip=(MANIFEST_FILE,))
            else:
                stage.mkdir(parents=True)
            self._stage = stage
        return self._stage

    def final(self, staged: PathLike) -> Path:
        """Where a file of the stage will be once committed."""
        staged = Path(staged)
        if self._stage is not None and staged.is_relative_to(self._stage):
            return self.path / staged.relative_to(self._stage)
        return staged

    def manifest(self) -> Optional[Dict[str, Any]]:
        """The committed folder's manifest (None if it has none)."""
        return read_manifest(self.path)

    def commit(self, *, state: str = "complete", extra: Optional[Dict[str, Any]] = None) -> Path:
        """Writes the manifest into the stage and swaps the stage in; returns the folder.

        Args:
            state: Recorded in the manifest ("complete"; QAT: "training", "done").
            extra: More manifest fields.
        """
        stage = self.stage()
        for name in self.keep:
            current = self.path / name
            if current.is_file() and not (stage / name).exists():
                with contextlib.suppress(OSError):
                    os.link(current, stage / name)
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": self.kind, "run_id": self.run_id,
            "store": self.store, "state": state, "files": _files(stage), "committed_at": _now(),
            "owner": ProcessOwner.current().to_dict(), **(extra or {}),
        }
        path = stage / MANIFEST_FILE
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=1))
            fh.flush()
            os.fsync(fh.fileno())
        swap_into_place(stage, self.path)
        self._stage = None
        return self.path

    def discard(self) -> None:
        """Drops the uncommitted stage (the committed folder is untouched)."""
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    def close(self) -> None:
        """Discards any stage and releases the lock."""
        self.discard()
        self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = [
    "MANIFEST_FILE",
    "RunFolder",
    "RunFolderStateError",
    "check_replaceable",
    "is_quantlab_folder",
    "read_manifest",
    "recover",
    "swap_into_place",
]
