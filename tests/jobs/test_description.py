"""RunDescription: every field checked (type, bounds), frozen, versioned, round-trips through to_dict/from_dict."""
import dataclasses
import json
import math
from pathlib import Path

import pytest

from quantlab.errors import QuantlabError
from quantlab.jobs.description import DESCRIPTION_VERSION, RunDescription, RunKind
from quantlab.jobs.errors import RunDescriptionError


def _good(**changes):
    base = dict(kind=RunKind.COMPARE, model="examples/fmnist.py:build", data="fmnist:calib", eval_data="fmnist:test",
                name="baseline", run_dir="runs/x", config={"metric": "top1", "calibrators": ["max"], "nested": {"a": (1, 2.5)}})
    base.update(changes)
    return RunDescription(**base)


def test_round_trip_through_json():
    description = _good(parent_id="compare-20260101-000000-abcdef")
    data = json.loads(json.dumps(description.to_dict()))
    assert data["kind"] == "compare" and data["version"] == DESCRIPTION_VERSION
    back = RunDescription.from_dict(data)
    assert back == description and back.kind is RunKind.COMPARE
    assert back.config["nested"]["a"] == [1, 2.5]  # tuples become lists, as JSON stores them


def test_frozen_and_config_read_only():
    description = _good()
    with pytest.raises(dataclasses.FrozenInstanceError):
        description.model = "other"
    with pytest.raises(TypeError):
        description.config["metric"] = "top5"
    copy = description.config_dict()
    copy["metric"] = "top5"
    assert description.config["metric"] == "top1"


def test_strings_and_paths_are_normalized():
    description = _good(kind="sensitivity", run_dir=Path("runs") / "x")
    assert description.kind is RunKind.SENSITIVITY and description.run_dir == str(Path("runs") / "x")
    assert description.store_kind == "sensitivity"
    assert RunKind.RUN.store_kind == "export" and RunKind.DEMO.store_kind == "compare" and RunKind.REPORT.store_kind is None


@pytest.mark.parametrize(
    "changes, field, fragment",
    [
        ({"kind": "calibrate"}, "kind", "not a job"),
        ({"kind": 3}, "kind", "not a job"),
        ({"model": ""}, "model", "empty"),
        ({"model": None}, "model", "required"),
        ({"model": 42}, "model", "string"),
        ({"model": "m" * 5000}, "model", "at most 4096"),
        ({"data": ["fmnist:calib"]}, "data", "string"),
        ({"eval_data": "   "}, "eval_data", "empty"),
        ({"name": "n" * 201}, "name", "at most 200"),
        ({"parent_id": "has space"}, "parent_id", "whitespace"),
        ({"run_dir": "a\x00b"}, "run_dir", "NUL"),
        ({"config": ["metric"]}, "config", "must be a dict"),
        ({"config": {"max_drop": math.inf}}, "config.max_drop", "finite"),
        ({"config": {"x": {"y": [1, math.nan]}}}, "config.x.y[1]", "finite"),
        ({"config": {1: "a"}}, "config", "not a string"),
        ({"config": {"path": Path("a")}}, "config.path", "only JSON values"),
        ({"version": DESCRIPTION_VERSION + 1}, "version", "upgrade quantlab"),
        ({"version": "1"}, "version", "integer"),
        ({"version": True}, "version", "integer"),
        ({"kind": RunKind.REPORT}, "parent_id", "give that run's id"),
    ],
)
def test_each_bad_field_is_named(changes, field, fragment):
    with pytest.raises(RunDescriptionError) as info:
        _good(**changes)
    assert info.value.field == field
    assert fragment in str(info.value) and str(info.value).startswith(field)
    assert isinstance(info.value, QuantlabError)


def test_deep_config_is_refused():
    deep = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(RunDescriptionError, match="nests deeper"):
        _good(config=deep)


@pytest.mark.parametrize(
    "data, field",
    [
        (["compare"], "description"),
        ({"kind": "compare"}, "model"),
        ({"model": "m"}, "kind"),
        ({"kind": "compare", "model": "m", "owner": 1}, "owner"),
        ({"kind": ["compare"], "model": "m"}, "kind"),
    ],
)
def test_from_dict_names_the_field(data, field):
    with pytest.raises(RunDescriptionError) as info:
        RunDescription.from_dict(data)
    assert info.value.field == field
