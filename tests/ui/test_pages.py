"""Every dashboard page through streamlit.testing's AppTest, on an empty store and on a real demo run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from quantlab.scales import Scales
from quantlab.store import RunStore
from tests.ui.helpers import PAGES, app_test, no_exceptions, open_page


def _texts(at) -> str:
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption] + [e.value for e in at.info]
    parts += [e.value for e in at.success] + [e.value for e in at.error] + [e.value for e in at.warning]
    parts += [str(m.label) + " " + str(m.value) for m in at.metric]
    return "\n".join(str(p) for p in parts)


def _frame(at, column: str, *, without: str = "\0"):
    """The first dataframe on the page that has ``column`` (and not ``without``)."""
    for element in at.dataframe:
        frame = element.value
        if column in frame.columns and without not in frame.columns:
            return frame
    raise AssertionError(f"no dataframe with column {column!r}; have {[list(e.value.columns) for e in at.dataframe]}")


def _ranking(at):
    return _frame(at, "rank", without="calibrator")


# -- empty store ------------------------------------------------------------------------------------
def test_empty_store_opens_on_the_get_started_page(empty_store):
    at = app_test()
    at.run()
    no_exceptions(at)
    assert at.title[0].value == "Welcome to quantlab"
    assert any(b.label == "Run the demo" for b in at.button)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_store(empty_store, page):
    at = open_page(page)
    no_exceptions(at)
    assert at.title, f"page {page} has no title"
    if page in ("runs", "compare", "layers", "export"):
        assert "No run" in _texts(at) or "No runs" in _texts(at)


# -- a real demo run --------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_a_demo_run(demo_store, page):
    at = open_page(page)
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]


def test_main_page_is_runs_once_the_store_has_runs(demo_store, demo_run):
    at = app_test()
    at.run()
    no_exceptions(at)
    assert at.title[0].value == "Runs"
    table = _frame(at, "best INT8 Δ")
    assert demo_run["run"]["id"] in set(table["id"])
    assert {"compare", "sensitivity", "export"} <= set(table["kind"])


def test_runs_filter_narrows_the_table(demo_store, demo_run):
    at = open_page("runs")
    at.text_input(key="runs-filter").input(demo_run["run"]["id"]).run()
    no_exceptions(at)
    table = _frame(at, "best INT8 Δ")
    assert list(table["id"]) == [demo_run["run"]["id"]]
    at.multiselect(key="runs-kinds").select("export").run()
    assert _frame(at, "best INT8 Δ").empty


def test_compare_table_shows_the_stored_numbers(demo_store, demo_run):
    run_id = demo_run["run"]["id"]
    stored = [r for r in RunStore(demo_store).results(run_id) if r["metric"] == "top1"]
    at = open_page("compare")
    no_exceptions(at)
    table = _frame(at, "Δ vs FP32")
    assert len(table) == len(stored) == 1 + 1 + 4  # FP32, FP16, INT8 x every calibrator
    by_label = {row["configuration"]: row for _, row in table.iterrows()}
    for row in stored:
        label = row["precision"].upper() if row["precision"] != "int8" else f"INT8 {row['calibrator']}"
        shown = by_label[label]
        assert shown["top1"] == pytest.approx(row["value"], abs=1e-9)
        assert shown["Δ vs FP32"] == pytest.approx(row["delta"], abs=1e-9)
    fp32 = next(r["value"] for r in stored if r["precision"] == "fp32")
    assert any(m.label == "FP32 top1" and m.value == f"{fp32:.2f} %" for m in at.metric)


def test_compare_tolerance_drives_the_verdicts(demo_store, demo_run):
    stored = [r for r in RunStore(demo_store).results(demo_run["run"]["id"]) if r["metric"] == "top1" and r["precision"] != "fp32"]
    at = open_page("compare")
    tolerance = at.number_input(key=f"compare-tol-{demo_run['run']['id']}")
    worst = min(r["delta"] for r in stored)
    tolerance.set_value(abs(worst) + 1.0).run()
    no_exceptions(at)
    assert set(_frame(at, "Δ vs FP32")["verdict"]) <= {"reference", "✓ within"}
    tolerance.set_value(0.0).run()
    verdicts = _frame(at, "Δ vs FP32").set_index("configuration")["verdict"]
    for r in stored:
        label = r["precision"].upper() if r["precision"] != "int8" else f"INT8 {r['calibrator']}"
        assert verdicts[label] == ("✓ within" if r["delta"] >= 0 else "✗ outside")
    expected = sum(r["delta"] >= 0 for r in stored)
    assert any(m.label == "Within tolerance" and m.value == f"{expected} / {len(stored)}" for m in at.metric)


def test_layers_histogram_shows_each_calibrators_amax(demo_store, demo_run):
    out = Path(demo_run["out"])
    at = open_page("layers")
    no_exceptions(at)
    tensor = at.selectbox(key="layers-tensor")
    scales = {name: Scales.load(out / f"scales.{name}.json") for name in ("entropy", "max", "mse", "percentile")}
    first = scales["max"]
    modules = [e.module for e in first.entries if e.role == "input" and e.module in first.statistics]
    info = json.loads((out / "results.json").read_text())["layer_info"]
    assert list(tensor.options) == [f"{m} · {info[m]}" for m in modules]  # each named with its type and shape
    module = modules[-1]
    tensor.set_value(module).run()
    no_exceptions(at)
    amax = _frame(at, "clipped").set_index("calibrator")["amax"]
    for name, sc in scales.items():
        assert amax[name] == pytest.approx(sc.get(module, "input").amax)
    # max calibration clips nothing; a calibrator with a smaller range clips something
    clipped = _frame(at, "clipped").set_index("calibrator")["clipped"]
    assert clipped["max"] == 0.0
    assert all(0.0 <= c < 1.0 for c in clipped)


def test_layers_ranking_comes_from_the_sensitivity_run(demo_store, demo_run):
    store = RunStore(demo_store)
    child = next(r for r in store.list_runs("sensitivity") if r["parent_id"] == demo_run["run"]["id"])
    rows = sorted(store.layer_stats(child["id"]), key=lambda r: r["rank"])
    at = open_page("layers")
    ranking = _ranking(at)
    assert list(ranking["layer"]) == [r["layer"] for r in rows]
    for shown, row in zip(ranking.itertuples(), rows):
        if row["sensitivity"] is None:
            assert math.isnan(shown.sensitivity)
        else:
            assert shown.sensitivity == pytest.approx(row["sensitivity"])


def test_layers_fp16_selection_measures_and_saves_a_mixed_config(demo_store, demo_run):
    store = RunStore(demo_store)
    run_id = demo_run["run"]["id"]
    at = open_page("layers")
    calibrator = at.selectbox(key="layers-mixed-cal").value
    at.button(key="layers-top-1").click().run()
    no_exceptions(at)
    chosen = at.multiselect(key="layers-fp16").value
    ranking = _ranking(at)
    assert chosen == [ranking["layer"].iloc[0]]
    assert any(m.label.startswith("Predicted, 1 in FP16") for m in at.metric)

    at.button(key="layers-measure").click().run(timeout=120)
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    measured = at.session_state["layers-measured"]
    results = store.results(run_id)
    fp32 = next(r["value"] for r in results if r["precision"] == "fp32" and r["metric"] == "top1")
    int8 = next(r["value"] for r in results if r["precision"] == "int8" and r["calibrator"] == calibrator and r["metric"] == "top1")
    # Same model, scales and eval batches as the stored run: the re-measured baselines are the stored numbers.
    assert measured["fp32"] == pytest.approx(fp32)
    assert measured["int8"] == pytest.approx(int8)
    shown = next(m for m in at.metric if m.label == "Measured, 1 in FP16")
    assert shown.value == f"{measured['mixed']:.2f} %"
    assert any(c.value.startswith("Measured on") for c in at.caption)

    at.button(key="layers-save").click().run()
    no_exceptions(at)
    saved = [a for a in store.artifacts(run_id) if a["kind"] == "mixed_scales"]
    assert saved, "the mixed-precision config was not recorded"
    mixed = Scales.load(saved[-1]["path"])
    assert chosen[0] not in {e.module for e in mixed.entries}
    full = Scales.load(Path(demo_run["out"]) / f"scales.{calibrator}.json")
    assert len(mixed.entries) == len([e for e in full.entries if e.module != chosen[0]])
    assert chosen[0] in mixed.config.exclude


def test_export_page_offers_every_artifact_and_the_check_report(demo_store, demo_run):
    from quantlab.export.check import check_model

    out = Path(demo_run["out"])
    at = open_page("export")
    no_exceptions(at)
    labels = _texts(at)
    for name in ("scales.entropy.json", "scales.max.json", "model.int8.onnx", "calibration.cache", "report.html", "check.md"):
        assert name in labels, f"no download for {name}"
    assert len(at.get("download_button")) >= 9
    report = check_model(out / "model.int8.onnx")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Errors"] == str(len(report.errors))
    assert metrics["Q/DQ nodes"] == str(report.num_qdq)
    assert metrics["Result"] == ("OK" if report.ok else "errors")
    info = "\n".join(i.value for i in at.info)
    assert "pip install" in info and "tensorrt" in info
    assert any("trtexec" in c.value and str(out / "model.int8.onnx") in c.value for c in at.code)


def test_compare_shows_mixed_precision_runs_of_the_same_model(demo_run, monkeypatch, tmp_path):
    """A real `autoprecision` run on the demo run appears in its Compare table (own store copy)."""
    import sqlite3

    from quantlab.jobs.autoprecision import run_autoprecision
    from quantlab.jobs.runs import load_run_info

    copy_path = tmp_path / "runs.sqlite"
    with sqlite3.connect(demo_run["store"]) as src, sqlite3.connect(copy_path) as dst:
        src.backup(dst)
    store = RunStore(copy_path)
    info = load_run_info(demo_run["out"], copy_path)
    outcome = run_autoprecision(info, store, max_drop=100.0, out_dir=str(tmp_path / "mixed"), export_onnx=False)
    mixed = next(r for r in store.results(outcome["run_id"]) if r["source"] == "mixed")
    monkeypatch.setenv("QUANTLAB_STORE", str(copy_path))
    at = open_page("compare")
    no_exceptions(at)
    table = _frame(at, "Δ vs FP32").set_index("configuration")
    label = f"Mixed INT8/FP16 ({mixed['calibrator']})"
    assert table.loc[label, "top1"] == pytest.approx(mixed["value"])
    assert table.loc[label, "Δ vs FP32"] == pytest.approx(mixed["delta"])
    at.toggle(key=f"compare-related-{demo_run['run']['id']}").set_value(False).run()
    assert label not in set(_frame(at, "Δ vs FP32")["configuration"])


def test_export_now_exports_a_run_that_was_not_exported(empty_store, tmp_path):
    import dataclasses

    from quantlab.jobs.demo import run_demo
    from quantlab.jobs.demo_spec import demo_spec, validate

    store = RunStore(empty_store)
    spec = validate(dataclasses.replace(demo_spec(str(tmp_path / "plain"), eval_samples=64, calib_samples=64),
                                        calibrators=["max"], precisions=["fp32", "int8"], sensitivity=False, export=False))
    run_id = run_demo(store, spec)["run_id"]
    at = open_page("export")
    no_exceptions(at)
    assert not any(a["kind"] == "onnx" for a in store.artifacts(run_id))
    at.button(key="export-now").click().run(timeout=120)
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    child = next(r for r in store.list_runs("export") if r["parent_id"] == run_id)
    kinds = {a["kind"]: a["path"] for a in store.artifacts(child["id"])}
    assert {"onnx", "check", "calibration_cache"} <= set(kinds)
    assert kinds["onnx"].endswith("model.int8.onnx")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ONNX models"] == "1" and metrics["Result"] in ("OK", "errors")


def test_get_started_runs_the_demo_in_one_click(empty_store, monkeypatch):
    from tests.ui.helpers import wait_for_status

    monkeypatch.setenv("QUANTLAB_DEMO_EVAL_SAMPLES", "64")
    monkeypatch.setenv("QUANTLAB_DEMO_CALIB_SAMPLES", "64")
    at = app_test()
    at.run()
    at.button(key="welcome-demo").click().run()
    no_exceptions(at)
    assert not at.error, [e.value for e in at.error]
    runs = RunStore(empty_store).list_runs()
    assert len(runs) == 1 and runs[0]["name"] == "Fashion-MNIST demo"
    job = runs[0]["config"]["job"]
    assert job["eval_data"] == "fmnist:test[:64]" and job["export"] and job["sensitivity"]
    assert at.title[0].value == "Welcome to quantlab"  # the page stays to show the progress
    assert at.progress, "no progress bar for the started demo"
    run = wait_for_status(empty_store, runs[0]["id"], timeout=180)
    assert run["status"] == "done", run["error"]
    at.run()
    no_exceptions(at)
    assert any("Best INT8" in m.value for m in at.markdown)
