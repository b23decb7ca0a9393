"""Algorithm parameters given as text (``--algorithm-param adaround.iterations=200``): parsed, typed, checked.

The module name starts with "_" so the registry does not take it for an algorithm module.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

from quantlab.algorithms.base import Algorithm, AlgorithmError, get_algorithm, list_algorithms, parse_algorithms

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


def parse_value(text: str) -> Any:
    """``"200"`` -> 200, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"[1, 2]"`` -> [1, 2]; anything else stays text."""
    value = text.strip()
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if isinstance(number, float) and not math.isfinite(number):
            raise AlgorithmError(f"algorithm parameter value {text!r} is not a finite number")
        return number
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def _typed(algorithm: Algorithm, key: str, value: Any) -> Any:
    """``value`` in the type of the declared default (an int where a float is expected is fine)."""
    default = (algorithm.params or {}).get(key)
    if default is None:
        return value
    where = f"{algorithm.name}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise AlgorithmError(f"algorithm parameter {where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise AlgorithmError(f"algorithm parameter {where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AlgorithmError(f"algorithm parameter {where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        return str(value)
    return value


def check_params(algorithms: Union[str, Sequence[str], None],
                 params: Optional[Mapping[str, Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """Checks per-algorithm parameters against the selected algorithms; returns them typed.

    Raises:
        AlgorithmError: one line: an unknown algorithm, parameters of an algorithm that is not selected, a name the algorithm
            does not declare (naming the known ones), or a value its ``check`` refuses (out of
            bounds, not one of the choices).
    """
    selected = {a.name: a for a in parse_algorithms(algorithms)}
    out: Dict[str, Dict[str, Any]] = {}
    for name, values in (params or {}).items():
        algorithm = get_algorithm(name)  # unknown: names the known algorithms
        if algorithm.name not in selected:
            chosen = ", ".join(selected) or "none"
            raise AlgorithmError(f"parameters given for {algorithm.name!r}, which is not among the selected algorithms ({chosen})")
        typed: Dict[str, Any] = {}
        for key, value in dict(values).items():
            if algorithm.params is not None and key not in algorithm.params:
                known = ", ".join(sorted(algorithm.params)) or "none"
                raise AlgorithmError(f"unknown parameter {key!r} of algorithm {algorithm.name!r}; its parameters: {known}")
            typed[key] = _typed(algorithm, key, value)
        if algorithm.check is not None:
            algorithm.check(typed)  # the bounds run() would refuse, refused before any stage runs
        out[algorithm.name] = typed
    return out


def parse_param_items(items: Optional[Iterable[str]]) -> Dict[str, Dict[str, Any]]:
    """``["adaround.iterations=200", "cle.max_iterations=5"]`` -> ``{"adaround": {"iterations": 200}, ...}``.

    Raises:
        AlgorithmError: an item not of the form ``algorithm.name=value`` (naming the known algorithms).
    """
    out: Dict[str, Dict[str, Any]] = {}
    for item in items or ():
        head, sep, value = str(item).partition("=")
        algorithm, dot, key = head.strip().partition(".")
        if not sep or not dot or not algorithm or not key.strip():
            raise AlgorithmError(f"--algorithm-param {item!r} must look like ALGORITHM.NAME=VALUE "
                                 f"(e.g. adaround.iterations=200); algorithms: {', '.join(list_algorithms()) or 'none'}")
        out.setdefault(algorithm.strip().lower(), {})[key.strip()] = parse_value(value)
    return out


def describe_params(algorithm: Algorithm) -> str:
    """``"iterations=1000, lr=0.01"`` (the declared defaults), ``"-"`` for none, ``"any"`` when not declared."""
    if algorithm.params is None:
        return "any"
    return ", ".join(f"{k}={v}" for k, v in algorithm.params.items()) or "-"


__all__ = ["check_params", "describe_params", "parse_param_items", "parse_value"]
