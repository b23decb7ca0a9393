"""Typed field checks with exact types: ``true`` is not a number, ``1.0`` is not an integer.

Every check names the file and the field path (``quantizers[3].amax``) and
raises the caller's error type, so a reader's message says exactly what to fix.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

from quantlab.errors import FileFormatError

_MISSING = object()
#: How run folders write non-finite numbers (JSON has none): ``str(float("inf"))`` and friends.
NONFINITE_TEXT = ("inf", "-inf", "nan")


def type_name(value: Any) -> str:
    """JSON's name for a Python value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Fields:
    """Checks the fields of one JSON object.

    Args:
        data: The object (a dict; anything else fails at construction).
        where: The file and path of the object, e.g. ``"scales.json: quantizers[2]"``.
        error: The exception type raised.
    """

    def __init__(self, data: Any, where: str, error: Type[Exception] = FileFormatError) -> None:
        self.where = where
        self.error = error
        if not isinstance(data, dict):
            raise error(f"{where}: must be an object, got {type_name(data)}")
        self.data = data

    def fail(self, key: str, message: str) -> Exception:
        return self.error(f"{self.where}: {key} {message}")

    def _get(self, key: str, required: bool, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if required:
                raise self.fail(key, "is missing")
            return default
        return value

    def string(self, key: str, *, required: bool = False, default: Optional[str] = None, nullable: bool = True,
               choices: Optional[Sequence[str]] = None, non_empty: bool = False, max_len: int = 1 << 16) -> Optional[str]:
        value = self._get(key, required, default)
        if value is None and nullable and not required:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {type_name(value)}")
        if non_empty and not value:
            raise self.fail(key, "must not be empty")
        if len(value) > max_len:
            raise self.fail(key, f"is {len(value)} characters long (at most {max_len})")
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def integer(self, key: str, *, required: bool = False, default: Optional[int] = None, nullable: bool = True,
                low: Optional[int] = None, high: Optional[int] = None) -> Optional[int]:
        value = self._get(key, required, default)
        if value is None and nullable and not required:
            return None
        if not is_int(value):
            raise self.fail(key, f"must be an integer, got {type_name(value)} {value!r}"[:200])
        check_bounds(value, f"{self.where}: {key}", low, high, self.error)
        return value

    def number(self, key: str, *, required: bool = False, default: Optional[float] = None, nullable: bool = True,
               finite: bool = True, low: Optional[float] = None, high: Optional[float] = None,
               positive: bool = False, text_nonfinite: bool = False) -> Optional[float]:
        """A number; with ``text_nonfinite`` also ``"inf"``/``"-inf"``/``"nan"`` (how run folders store them)."""
        value = self._get(key, required, default)
        if value is None and nullable and not required:
            return None
        if text_nonfinite and value in NONFINITE_TEXT:
            return float(value)
        return check_number(value, f"{self.where}: {key}", finite=finite, low=low, high=high, positive=positive, error=self.error)

    def boolean(self, key: str, *, required: bool = False, default: Optional[bool] = None, nullable: bool = True) -> Optional[bool]:
        value = self._get(key, required, default)
        if value is None and nullable and not required:
            return None
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {type_name(value)}")
        return value

    def obj(self, key: str, *, required: bool = False, nullable: bool = True) -> Optional[Dict[str, Any]]:
        value = self._get(key, required, None)
        if value is None and nullable and not required:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, f"must be an object, got {type_name(value)}")
        return value

    def sub(self, key: str, *, required: bool = False) -> Optional["Fields"]:
        value = self.obj(key, required=required)
        return None if value is None else Fields(value, f"{self.where}: {key}", self.error)

    def array(self, key: str, *, required: bool = False, nullable: bool = True, max_len: int = 1 << 24) -> Optional[List[Any]]:
        value = self._get(key, required, None)
        if value is None and nullable and not required:
            return None
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {type_name(value)}")
        if len(value) > max_len:
            raise self.fail(key, f"holds {len(value)} items (at most {max_len})")
        return value

    def strings(self, key: str, *, required: bool = False) -> Optional[List[str]]:
        value = self.array(key, required=required)
        if value is None:
            return None
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{key}[{i}]", f"must be a string, got {type_name(item)}")
        return value

    def string_map(self, key: str, *, required: bool = False) -> Optional[Dict[str, str]]:
        value = self.obj(key, required=required)
        if value is None:
            return None
        for k, v in value.items():
            if not isinstance(v, str):
                raise self.fail(f"{key}[{k!r}]", f"must be a string, got {type_name(v)}")
        return value


def check_bounds(value: float, where: str, low: Optional[float], high: Optional[float], error: Type[Exception]) -> None:
    if low is not None and value < low:
        raise error(f"{where} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise error(f"{where} must be <= {high}, got {value!r}")


def check_number(value: Any, where: str, *, finite: bool = True, low: Optional[float] = None, high: Optional[float] = None,
                 positive: bool = False, error: Type[Exception] = FileFormatError) -> float:
    """``value`` as a float, if it is a number (not a bool) within the bounds."""
    if not is_number(value):
        raise error(f"{where} must be a number, got {type_name(value)} {str(value)[:60]!r}")
    number = float(value) if not (is_int(value) and abs(value) > 1 << 1023) else math.inf
    if math.isnan(number) or (finite and math.isinf(number)):
        raise error(f"{where} must be a finite number, got {value!r}"[:200])
    if positive and not number > 0:
        raise error(f"{where} must be > 0, got {value!r}")
    check_bounds(number, where, low, high, error)
    return number


def check_mapping(value: Any, where: str, error: Type[Exception] = FileFormatError) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise error(f"{where} must be an object, got {type_name(value)}")
    return value


__all__ = ["Fields", "check_bounds", "check_mapping", "check_number", "is_int", "is_number", "type_name"]
