"""Weight-cache helpers: atomic writes, a cross-process lock, tolerant loads."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quantlab._io import CACHE_ENV, default_cache_dir  # noqa: F401 - re-exported for the weight cache


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` with ``torch.save`` so readers never see a partial file.

    Args:
        state: Tensors to save.
        path: Destination; its directory is created if needed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (no-op where fcntl is missing).

    Concurrent processes asking for the same missing weights then train once
    instead of each burning a minute of CPU.

    Args:
        path: Lock file to create/lock.
    """
    try:
        import fcntl
    except ImportError:  # Windows: fall back to no locking; the atomic write still keeps files whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def file_signature(path: Path) -> tuple[int, int] | None:
    """Return ``(mtime_ns, size)`` of ``path``, or None if it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def load_weights_or_warn(path: Path, model: nn.Module) -> bool:
    """Load a ``weights_only`` state dict into ``model``.

    Args:
        path: Cached state-dict file.
        model: Module to load into (strict key/shape match).

    Returns:
        True on success; False (after a ``RuntimeWarning``) if the file is
        corrupt or does not match the model.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # any unreadable or mismatched cache is recoverable by retraining
        warnings.warn(f"cached weights at {path} could not be loaded ({exc}); retraining", RuntimeWarning, stacklevel=3)
        return False
    return True
