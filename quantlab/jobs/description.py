"""What a job run is: a typed, frozen, versioned :class:`RunDescription`.

Every job builds one before it records anything; the recorder
(:mod:`quantlab.jobs.recorder`) turns it into the run store's record. Each field
is checked when the description is made (and again by :meth:`RunDescription.from_dict`
for one read back from a file), so a bad field fails here, naming the field,
not half-way through a job.

    description = RunDescription(kind=RunKind.COMPARE, model="examples/fmnist.py:build",
                                 data="fmnist:calib", eval_data="fmnist:test", run_dir="runs/fmnist",
                                 config={"metric": "top1", "calibrators": ["max", "entropy"]})
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import json
import math
import os
import types
from typing import Any, Dict, Mapping, Optional

from quantlab.jobs.errors import RunDescriptionError

#: The format version of :meth:`RunDescription.to_dict`; ``from_dict`` reads this version and older.
DESCRIPTION_VERSION = 1

MAX_TEXT = 4096  # a model/data spec or a path
MAX_NAME = 200  # a label or a run id
MAX_CONFIG_BYTES = 1_000_000
MAX_CONFIG_DEPTH = 32


class RunKind(str, enum.Enum):
    """The jobs that record runs."""

    COMPARE = "compare"
    SENSITIVITY = "sensitivity"
    AUTOPRECISION = "autoprecision"
    EXPORT = "export"
    RUN = "run"  # an ONNX model (or TensorRT plan) evaluated by a runtime
    QAT = "qat"
    DEMO = "demo"  # compare -> sensitivity -> export, the job of `quantlab demo` and the New run page
    REPORT = "report"  # a report of a recorded run: an artifact of that run, no record of its own

    @property
    def store_kind(self) -> Optional[str]:
        """The run store's kind for this job (None: recorded on its parent run)."""
        return _STORE_KINDS[self]


# The store's kinds predate the jobs layer: an evaluated ONNX file has always been an "export" run and
# the demo job a "compare" run (the dashboard finds its jobs as compare runs with a "job" config).
_STORE_KINDS: Dict[RunKind, Optional[str]] = {
    RunKind.COMPARE: "compare",
    RunKind.SENSITIVITY: "sensitivity",
    RunKind.AUTOPRECISION: "autoprecision",
    RunKind.EXPORT: "export",
    RunKind.RUN: "export",
    RunKind.QAT: "qat",
    RunKind.DEMO: "compare",
    RunKind.REPORT: None,
}

_FIELDS = ("version", "kind", "model", "data", "eval_data", "name", "parent_id", "run_dir", "config")


def _text(field: str, value: Any, *, limit: int, optional: bool = True, one_word: bool = False) -> Optional[str]:
    if value is None:
        if optional:
            return None
        raise RunDescriptionError(field, "is required (a non-empty string)")
    if isinstance(value, os.PathLike) and field == "run_dir":
        value = os.fspath(value)
    if not isinstance(value, str):
        raise RunDescriptionError(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RunDescriptionError(field, "must not be empty")
    if len(value) > limit:
        raise RunDescriptionError(field, f"is {len(value)} characters long; at most {limit}")
    if "\x00" in value or (one_word and any(c.isspace() for c in value)):
        raise RunDescriptionError(field, f"{value[:60]!r} holds a NUL byte or whitespace")
    return value


def _json_value(field: str, value: Any, depth: int) -> Any:
    """A deep copy of ``value`` with tuples as lists; raises unless it is plain, finite JSON."""
    if depth > MAX_CONFIG_DEPTH:
        raise RunDescriptionError(field, f"nests deeper than {MAX_CONFIG_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RunDescriptionError(field, f"must be a finite number, got {value}")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RunDescriptionError(field, f"has a key {key!r} that is not a string")
            out[key] = _json_value(f"{field}.{key}", item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(f"{field}[{i}]", item, depth + 1) for i, item in enumerate(value)]
    raise RunDescriptionError(field, f"holds a {type(value).__name__}; only JSON values (dict, list, str, number, bool, None)")


def _config(value: Any) -> Mapping[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise RunDescriptionError("config", f"must be a dict, got {type(value).__name__}")
    plain = _json_value("config", value, 0)
    size = len(json.dumps(plain))
    if size > MAX_CONFIG_BYTES:
        raise RunDescriptionError("config", f"is {size} bytes as JSON; at most {MAX_CONFIG_BYTES}")
    return types.MappingProxyType(plain)


@dataclasses.dataclass(frozen=True)
class RunDescription:
    """One job run as the run store records it.

    Attributes:
        kind: Which job (:class:`RunKind`; a string is accepted and checked).
        model: The model spec (``file.py:factory``, ``package.module:factory``, ``.pt``/``.pt2``,
            an ONNX file, or a class name for a model given from Python).
        data: Calibration or training data spec, if any.
        eval_data: Eval data spec, if any.
        name: A label for the Runs page.
        parent_id: The run this one was started from (a sensitivity run's compare run, ...).
        run_dir: The run folder (a path; stored as a string).
        config: The job's settings: JSON values only (dict, list, str, finite number, bool,
            None), read-only; ``to_dict`` gives a plain copy.
        version: :data:`DESCRIPTION_VERSION`.

    Raises:
        RunDescriptionError: a field has the wrong type or is out of bounds (naming it).
    """

    kind: RunKind
    model: str
    data: Optional[str] = None
    eval_data: Optional[str] = None
    name: Optional[str] = None
    parent_id: Optional[str] = None
    run_dir: Optional[str] = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    version: int = DESCRIPTION_VERSION

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the checked, normalized values replace the given ones once
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise RunDescriptionError("version", f"must be an integer, got {type(self.version).__name__}")
        if not 1 <= self.version <= DESCRIPTION_VERSION:
            raise RunDescriptionError(
                "version", f"{self.version} is not a version this quantlab reads (1..{DESCRIPTION_VERSION}); upgrade quantlab"
            )
        kind = self.kind
        if not isinstance(kind, RunKind):
            if not isinstance(kind, str) or kind not in {k.value for k in RunKind}:
                raise RunDescriptionError("kind", f"{kind!r} is not a job; expected one of {', '.join(k.value for k in RunKind)}")
            kind = RunKind(kind)
        set_(self, "kind", kind)
        set_(self, "model", _text("model", self.model, limit=MAX_TEXT, optional=False))
        set_(self, "data", _text("data", self.data, limit=MAX_TEXT))
        set_(self, "eval_data", _text("eval_data", self.eval_data, limit=MAX_TEXT))
        set_(self, "name", _text("name", self.name, limit=MAX_NAME))
        set_(self, "parent_id", _text("parent_id", self.parent_id, limit=MAX_NAME, one_word=True))
        set_(self, "run_dir", _text("run_dir", self.run_dir, limit=MAX_TEXT))
        set_(self, "config", _config(self.config))
        if kind.store_kind is None and self.parent_id is None:
            raise RunDescriptionError("parent_id", f"a {kind.value} is recorded on the run it belongs to: give that run's id")

    @property
    def store_kind(self) -> Optional[str]:
        """The run store's kind (see :attr:`RunKind.store_kind`)."""
        return self.kind.store_kind

    def config_dict(self) -> Dict[str, Any]:
        """A plain, mutable deep copy of :attr:`config`."""
        return copy.deepcopy(dict(self.config))

    def replace(self, **changes: Any) -> "RunDescription":
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (``kind`` as its string); :meth:`from_dict` reads it back."""
        return {
            "version": self.version, "kind": self.kind.value, "model": self.model, "data": self.data,
            "eval_data": self.eval_data, "name": self.name, "parent_id": self.parent_id, "run_dir": self.run_dir,
            "config": self.config_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "RunDescription":
        """Reads :meth:`to_dict`'s output, checking every field.

        Raises:
            RunDescriptionError: not a dict, an unknown or missing field, or a field of the wrong type
                or out of bounds (the message names it).
        """
        if not isinstance(data, Mapping):
            raise RunDescriptionError("description", f"must be a dict, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _FIELDS)
        if unknown:
            raise RunDescriptionError(unknown[0], f"is not a field of a run description (fields: {', '.join(_FIELDS)})")
        for required in ("kind", "model"):
            if required not in data:
                raise RunDescriptionError(required, "is missing")
        return cls(**{key: data[key] for key in _FIELDS if key in data})


__all__ = ["DESCRIPTION_VERSION", "RunDescription", "RunKind", "RunDescriptionError"]
