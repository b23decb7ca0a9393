"""The numbers of what INT8 buys and costs on the dashboard equal the numbers stored: n, 95% intervals,
paired tests, agreement, output fidelity, deployment latency/size (Compare) and the sensitivity noise (Layers)."""
from __future__ import annotations

import math

import pytest

from quantlab.evaluation import present
from quantlab.runtimes.tensorrt.loader import tensorrt_available
from quantlab.store import RunStore
from quantlab.ui import numbers
from tests.ui.helpers import no_exceptions, open_page


def _frame(at, column: str):
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no dataframe with column {column!r}; have {[list(e.value.columns) for e in at.dataframe]}")


def _label(row) -> str:
    return present.configuration_label(row["precision"], row["calibrator"], row["source"])


def test_compare_shows_the_stored_noise_and_a_right_interval(demo_store, demo_run):
    run_id = demo_run["run"]["id"]
    stored = {_label(r): r for r in RunStore(demo_store).results(run_id) if r["metric"] == "top1"}
    agreement = {_label(r): r["value"] for r in RunStore(demo_store).results(run_id) if r["metric"] == "top1_agreement"}
    at = open_page("compare")
    no_exceptions(at)
    table = _frame(at, "95% CI").set_index("configuration")
    assert set(table.index) == set(stored)
    for label, row in stored.items():
        shown = table.loc[label]
        assert shown["n"] == row["n"] and shown["95% CI"] == numbers.interval_text(row["ci_low"], row["ci_high"])
        assert shown["p vs FP32"] == present.format_p(row["p_value"]) and shown["noise"] == present.noise_verdict(row)
        assert shown["agreement"] == pytest.approx(agreement[label])
    # A known case, computed here independently: the Wilson score interval of FP32's top-1 (k of n correct).
    fp32 = stored["FP32"]
    n, p, z = fp32["n"], fp32["value"] / 100.0, 1.959963984540054
    center, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert fp32["ci_low"] == pytest.approx(100 * (center - half)) and fp32["ci_high"] == pytest.approx(100 * min(1.0, center + half))
    assert n == 300  # the demo fixture's eval samples: every sample counted once
    assert all(stored[k]["paired_test"].startswith("McNemar") for k in stored if k != "FP32")
    assert "Wilson 95%" in "\n".join(c.value for c in at.caption)


def test_compare_shows_the_stored_fidelity_and_deployment_cost(demo_store, demo_run):
    run_id = demo_run["run"]["id"]
    store = RunStore(demo_store)
    at = open_page("compare")
    no_exceptions(at)
    fidelity = _frame(at, "1 − cos").set_index("configuration")
    stored_fidelity = {_label(r): r for r in store.fidelity(run_id)}
    assert set(fidelity.index) == set(stored_fidelity) and "FP16" in stored_fidelity
    for label, row in stored_fidelity.items():
        for key, column in numbers.FIDELITY_COLUMNS.items():
            if key != "configuration":
                assert fidelity.loc[label, column] == pytest.approx(row[key]), (label, key)
    cost = _frame(at, "timing source").set_index("configuration")
    measured = [r for r in store.deployment(run_id) if r["status"] == "measured"]
    assert {_label(r) for r in measured} == set(cost.index) == {_label(r) for r in store.results(run_id) if r["metric"] == "top1"}
    for row in measured:
        shown = cost.loc[_label(row)]
        assert shown[f"batch {row['batch_size']} median (ms)"] == pytest.approx(row["latency_ms_median"])
        assert shown[f"batch {row['batch_size']} min (ms)"] == pytest.approx(row["latency_ms_min"])
        assert shown["size (MB)"] == pytest.approx(row["size_mb"]) and shown["timing source"] == row["label"]
        assert row["label"].startswith("onnxruntime-cpu ")
    assert set(cost["TensorRT"]) == ({"not measured"} if tensorrt_available() else {"not installed"})
    assert cost.loc["INT8 max", "size (MB)"] < cost.loc["FP32", "size (MB)"]


def test_sensitivity_ranking_shows_the_stored_noise(demo_store, demo_run):
    store = RunStore(demo_store)
    child = next(r for r in store.list_runs("sensitivity") if r["parent_id"] == demo_run["run"]["id"])
    rows = sorted(store.layer_stats(child["id"]), key=lambda r: r["rank"])
    assert any(r["sensitivity_n"] for r in rows)
    at = open_page("layers")
    no_exceptions(at)
    ranking = _frame(at, "noise")  # the ranking (the per-layer table has no verdict column)
    assert list(ranking["layer"]) == [r["layer"] for r in rows]
    for shown, row in zip(ranking.to_dict("records"), rows):
        if row["sensitivity_p"] is None:
            assert math.isnan(shown["sensitivity_p"]) and shown["noise"] == "-"
        else:
            assert shown["sensitivity_p"] == pytest.approx(row["sensitivity_p"]) and shown["sensitivity_n"] == row["sensitivity_n"]
            assert shown["noise"] == ("within noise" if row["sensitivity_within_noise"] else "outside noise")
