"""Atomic file writes: an artifact is either complete or absent, never half-written."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

CACHE_ENV = "QUANTLAB_CACHE"


def default_cache_dir() -> Path:
    """Return ``$QUANTLAB_CACHE`` or ``~/.cache/quantlab`` (weights, compiled kernels, probes)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantlab"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` on success.

    The temporary file lives in the same folder so ``os.replace`` is atomic. On
    any exception the temporary file is removed and ``path`` is left untouched.

    Raises:
        IsADirectoryError / NotADirectoryError / PermissionError: ``path`` is a folder, or its
            folder cannot be created or written (the message names the path).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder; a file is expected there")
    # OSErrors with messages that name the path (callers that tolerate an unwritable place catch OSError).
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot write {target}: a file stands where a folder of its path is expected") from None
    except PermissionError:
        raise PermissionError(f"cannot write {target}: permission denied in {target.parent}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically (UTF-8) and returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
