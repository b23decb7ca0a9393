"""One writer per run folder: an advisory ``flock`` that the kernel drops when its process dies.

The lock is a small file beside the folder (``<parent>/.<name>.lock``), not in
it, because a commit replaces the folder as a whole. It holds the owner (pid,
host, start, command) so a refused second writer can say who holds it. A
process killed with SIGKILL releases it: the kernel closes its descriptors.
The file itself stays (removing it would race a waiting writer) and is tiny.

``flock`` is per open file description, so a second :class:`RunLock` on the
same folder in the same process is refused too (two writers in one process
mix artifacts just as well).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Union

from quantlab.store.errors import StoreError
from quantlab.store.owner import ProcessOwner

PathLike = Union[str, "os.PathLike[str]"]


class RunLockedError(StoreError):
    """Another process (or another writer in this one) is writing the run folder."""


def lock_path(folder: PathLike) -> Path:
    """The lock file of a run folder."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


class RunLock:
    """An exclusive lock on a run folder (a context manager; :meth:`release` is idempotent).

    Args:
        folder: The run folder (need not exist yet; its parent is created).
        purpose: What the holder does ("quantlab compare"), shown to refused writers.

    Raises:
        RunLockedError: someone holds it (naming who), at construction.
    """

    def __init__(self, folder: PathLike, purpose: str = "") -> None:
        self.folder = Path(os.path.abspath(folder))
        self.path = lock_path(self.folder)
        self.owner = ProcessOwner.current()
        self._fd: Optional[int] = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _lock(fd)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.folder} is being written by {holder or 'another quantlab process'}: "
                "wait for it to finish, or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        record = {**self.owner.to_dict(), "purpose": purpose or " ".join(sys.argv[:3])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock must not outlive its object
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _lock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return ""
    owner = ProcessOwner.from_dict(data)
    if owner is None:
        return ""
    purpose = data.get("purpose") if isinstance(data.get("purpose"), str) else ""
    return f"{purpose + ' ' if purpose else ''}({owner.describe()})"


def is_locked(folder: PathLike) -> bool:
    """Whether a writer holds the folder's lock now (tries it without waiting)."""
    path = lock_path(folder)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


__all__ = ["RunLock", "RunLockedError", "is_locked", "lock_path"]
