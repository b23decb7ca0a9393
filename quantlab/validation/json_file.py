"""Reading JSON that someone else may have written: size and nesting bounded before parsing.

``json.loads`` recurses once per nesting level, so 400 KB of ``[`` raises
RecursionError, and a multi-gigabyte file is read whole before anything is
checked. Here the size is checked from ``stat`` before reading, the nesting
depth by a scan of the text before parsing, duplicate keys are refused (which
value would win is an accident of the parser), and so are ``NaN``/``Infinity``
unless the format allows them. Every failure is the caller's error type,
naming the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Type, Union

from quantlab.errors import FileFormatError

#: Deepest nesting any quantlab file has is about 6 levels; 64 leaves room for user configs.
MAX_DEPTH = 64
#: Default size bound; readers of big artifacts (scales with histograms) pass their own.
MAX_BYTES = 64 << 20

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS_RE = re.compile(r"[\[\]{}]")


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting of JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _BRACKETS_RE.finditer(_STRING_RE.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_duplicates(where: str, error: Type[Exception]):
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: key {key!r} appears twice in one object")
            out[key] = value
        return out

    return hook


def parse_json_text(
    text: str,
    where: str,
    *,
    error: Type[Exception] = FileFormatError,
    max_depth: int = MAX_DEPTH,
    allow_nan: bool = False,
) -> Any:
    """Parses ``text`` with the bounds above.

    Args:
        text: The JSON text.
        where: The file (or field) named in messages.
        error: The exception type to raise (a :class:`QuantlabError` subclass).
        max_depth: Deepest nesting accepted.
        allow_nan: Accept ``NaN``/``Infinity``/``-Infinity`` (some run files hold NaN losses).

    Raises:
        error: not JSON, too deep, duplicate keys, NaN where not allowed.
    """
    depth = nesting_depth(text)
    if depth > max_depth:
        raise error(f"{where}: JSON nested {depth} levels deep (at most {max_depth} accepted): not a quantlab file")

    def constant(name: str) -> float:
        if not allow_nan:
            raise error(f"{where}: {name} is not a JSON number (quantlab writes only finite numbers here)")
        return float(name.replace("Infinity", "inf"))

    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where, error), parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: corrupt or truncated JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:  # the depth scan above makes this unreachable; kept as a last guard
        raise error(f"{where}: JSON nested too deeply") from None


def read_json_file(
    path: Union[str, "os.PathLike[str]"],
    *,
    what: str = "file",
    error: Type[Exception] = FileFormatError,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    allow_nan: bool = False,
    missing: Optional[Type[Exception]] = None,
) -> Any:
    """Reads and parses a JSON file with the bounds above.

    Args:
        path: The file.
        what: What the file is, for messages ("scales file", "run.json").
        error: Exception type for every problem.
        max_bytes: Largest file accepted (checked before reading).
        max_depth / allow_nan: See :func:`parse_json_text`.
        missing: Exception type for a missing file (default ``error``).

    Raises:
        error: missing, a folder, too big, not UTF-8, not valid JSON.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise (missing or error)(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if path.is_dir():
        raise error(f"{path}: is a folder, not a {what}")
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size / 1e6:.1f} MB is larger than any {what} ({max_bytes / 1e6:.0f} MB at most)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # grew between stat and read
        raise error(f"{path}: larger than any {what} ({max_bytes / 1e6:.0f} MB at most)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a text (JSON) file") from None
    return parse_json_text(text, str(path), error=error, max_depth=max_depth, allow_nan=allow_nan)


__all__ = ["MAX_BYTES", "MAX_DEPTH", "nesting_depth", "parse_json_text", "read_json_file"]
