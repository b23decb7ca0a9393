"""Code a recorded run would run: whose is it? Said before it runs.

A run folder records its model (and maybe its metric) as ``file.py:function``.
Re-running the run (sensitivity, autoprecision, the dashboard's export and
mixed-precision measurements) imports that file: its top-level Python code
runs as YOU. That is fine for your own runs; for a folder or store someone else
wrote, it is their code with your rights.

A run is "someone else's" when any of these holds (:func:`foreign_reasons`):

* a Python file it would import is owned by another user, or is writable by
  users other than its owner (anyone could have changed it);
* the run folder's ``run.json`` or the run store file is owned by another user
  (they chose what file it names).

Packages imported by module name (``package.module:factory``) come from your
own Python environment and are not flagged. Weights load with
``weights_only=True`` and TorchScript/``.pt2`` files hold no Python code.
The CLI refuses such a run unless ``--trust`` is given; the dashboard shows
the reasons and runs nothing until the user ticks a box.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from quantlab.errors import QuantlabError

PathLike = Union[str, "os.PathLike[str]"]


class UntrustedRunError(QuantlabError):
    """A recorded run would import Python code that is not clearly the user's own."""


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


def _me() -> Optional[int]:
    return os.getuid() if hasattr(os, "getuid") else None


def python_file_of(spec: Optional[str]) -> Optional[Path]:
    """The ``.py`` file a ``file.py:function`` spec imports (None for module names and saved graphs)."""
    if not spec or ":" not in str(spec):
        return None
    module_part = str(spec).rpartition(":")[0]
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        return Path(module_part).expanduser()
    return None


def _owner_reason(path: Path, what: str, me: int) -> Optional[str]:
    try:
        info = path.stat()
    except OSError:
        return None
    if info.st_uid != me:
        return f"{what} {path} is owned by {_user(info.st_uid)}"
    if path.is_file() and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} {path} is writable by other users"
    return None


def foreign_reasons(info: Dict[str, Any], *, run_dir: Optional[PathLike] = None, store_path: Optional[PathLike] = None) -> List[str]:
    """Why re-running the recorded run ``info`` (a run.json) would run someone else's code; [] if it would not."""
    me = _me()
    if me is None:  # no user ids (Windows): nothing to compare
        return []
    # Relative paths resolve against the current folder, as the import will.
    files = [(key, python_file_of(info.get(key))) for key in ("model", "metric")]
    files = [(key, path) for key, path in files if path is not None]
    if not files:
        return []
    reasons = []
    for key, path in files:
        reason = _owner_reason(path, f"the {key} file", me)
        if reason:
            reasons.append(reason)
    if run_dir is not None:
        reason = _owner_reason(Path(run_dir) / "run.json", "the run's run.json", me)
        if reason:
            reasons.append(reason)
    if store_path is not None and Path(store_path).exists():
        reason = _owner_reason(Path(store_path), "the run store", me)
        if reason:
            reasons.append(reason)
    return reasons


def require_trusted(info: Dict[str, Any], *, trust: bool, run_dir: Optional[PathLike] = None,
                    store_path: Optional[PathLike] = None) -> List[str]:
    """Raises unless the run is the user's own or ``trust`` is given; returns the reasons (for a warning).

    Raises:
        UntrustedRunError: naming the files and owners, and how to proceed.
    """
    reasons = foreign_reasons(info, run_dir=run_dir, store_path=store_path)
    if reasons and not trust:
        code = ", ".join(str(python_file_of(info.get(k))) for k in ("model", "metric") if python_file_of(info.get(k)))
        raise UntrustedRunError(
            f"re-running this run imports {code}, which runs its Python code as you, and it is not clearly yours: "
            + "; ".join(reasons) + ". Read the file, then pass --trust to run it"
        )
    return reasons


__all__ = ["UntrustedRunError", "foreign_reasons", "python_file_of", "require_trusted"]
