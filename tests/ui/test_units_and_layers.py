"""Units, labels and the per-layer view (issue 17, items 3, 4 and 6) on the real demo run, through AppTest.

Every number checked here is read back from the run store or the run folder the
demo wrote, and compared with what the page shows.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from quantlab.scales import Scales
from quantlab.store import RunStore
from quantlab.ui import summaries
from tests.ui.helpers import no_exceptions, open_page


def _frame(at, column: str):
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no dataframe with column {column!r}; have {[list(e.value.columns) for e in at.dataframe]}")


def _chart_data(at, mark: str):
    """The data frame behind the first Altair chart on the page whose (layered) spec uses ``mark``."""
    import pyarrow as pa

    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        marks = [layer.get("mark", {}).get("type") for layer in spec.get("layer", [spec])]
        if mark in marks:
            return pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().to_pandas(), spec
    raise AssertionError(f"no chart with a {mark!r} mark")


def _top1(store: RunStore, run_id: str):
    return {(r["precision"], r["calibrator"]): r for r in store.results(run_id) if r["metric"] == "top1" and r["source"] == "ptq"}


def test_runs_table_has_fp16_duration_and_units(demo_store, demo_run):
    store = RunStore(demo_store)
    run = store.get_run(demo_run["run"]["id"])
    rows = _top1(store, run["id"])
    at = open_page("runs")
    no_exceptions(at)
    table = _frame(at, "FP16 shown").set_index("id")
    shown = table.loc[run["id"]]
    assert shown["FP32"] == pytest.approx(rows[("fp32", None)]["value"])
    assert shown["FP16"] == pytest.approx(rows[("fp16", None)]["value"])
    assert shown["FP32 shown"] == f"{rows[('fp32', None)]['value']:.2f} %"
    assert shown["FP16 shown"] == f"{rows[('fp16', None)]['value']:.2f} %"
    best = summaries.best_int8(store.results(run["id"]), "top1")
    assert shown["best shown"] == f"{best['calibrator']} {best['delta']:+.2f} points"
    expected = summaries.run_seconds(run)
    assert expected is not None and expected > 0
    assert shown["duration s"] == pytest.approx(expected)


def test_compare_cards_say_percent_and_points(demo_store, demo_run):
    rows = _top1(RunStore(demo_store), demo_run["run"]["id"])
    at = open_page("compare")
    no_exceptions(at)
    cards = {m.label: m for m in at.metric}
    assert cards["FP32 top1"].value == f"{rows[('fp32', None)]['value']:.2f} %"
    assert cards["FP16 top1"].value == f"{rows[('fp16', None)]['value']:.2f} %"
    assert cards["FP16 top1"].delta == f"{rows[('fp16', None)]['delta']:+.2f} points"


def test_heatmap_has_a_cell_per_layer_and_calibrator(demo_store, demo_run):
    store = RunStore(demo_store)
    stats = store.layer_stats(demo_run["run"]["id"])
    at = open_page("layers")
    no_exceptions(at)
    cells, spec = _chart_data(at, "rect")
    layers = list(dict.fromkeys(r["layer"] for r in stats))
    calibrators = sorted({r["calibrator"] for r in stats})
    assert len(cells) == len(layers) * len(calibrators) == len(stats)
    by_cell = {(c.layer, c.calibrator): c.value for c in cells.itertuples()}
    for row in stats:
        assert by_cell[(row["layer"], row["calibrator"])] == pytest.approx(row["sqnr_db"])
    assert spec["layer"][0]["encoding"]["color"]["title"] == "SQNR (dB)"
    assert any(layer.get("mark", {}).get("type") == "text" for layer in spec["layer"])  # every cell labelled


def test_layers_are_named_with_type_and_shape(demo_store, demo_run):
    from quantlab.evaluation.layer_info import describe_layers
    from quantlab.models.fmnist import pretrained_fmnist_cnn

    recorded = json.loads((Path(demo_run["out"]) / "results.json").read_text())["layer_info"]
    model = describe_layers(pretrained_fmnist_cnn())
    assert recorded["stem.0"] == model["stem.0"] == "Conv2d 1→16 3×3"
    assert recorded["down1.0"] == "Conv2d 16→32 3×3 s2" and recorded["fc"] == "Linear 64→10"
    at = open_page("layers")
    pick = at.selectbox(key="layers-pick")
    assert pick.options[0] == "stem.0 · Conv2d 1→16 3×3"
    cells, _ = _chart_data(at, "rect")
    assert set(cells["label"]) == {summaries.layer_label(name, recorded) for name in cells["layer"]}
    table = _frame(at, "type and shape")
    assert "sqnr_db" not in table.columns and "SQNR in the INT8 model (dB)" in table.columns
    assert dict(zip(table["layer"], table["type and shape"]))["fc"] == "Linear 64→10"


def test_lowest_sqnr_card_names_its_calibrator(demo_store, demo_run):
    stats = RunStore(demo_store).layer_stats(demo_run["run"]["id"])
    worst = min(stats, key=lambda r: r["sqnr_db"])
    at = open_page("layers")
    cards = {m.label: m.value for m in at.metric}
    assert cards[f"Lowest SQNR · {worst['calibrator']}"] == f"{worst['sqnr_db']:.1f} dB"
    assert cards["Lowest-SQNR layer"] == worst["layer"]


def test_picking_a_layer_shows_its_histogram_and_sensitivity(demo_store, demo_run):
    store = RunStore(demo_store)
    child = next(r for r in store.list_runs("sensitivity") if r["parent_id"] == demo_run["run"]["id"])
    ranked = next(r for r in store.layer_stats(child["id"]) if r["sensitivity"] is not None)
    at = open_page("layers")
    at.selectbox(key="layers-pick").set_value(ranked["layer"]).run()
    no_exceptions(at)
    detail = _frame(at, "local_sqnr_db").set_index("calibrator")
    assert detail.loc[ranked["calibrator"], "sensitivity"] == pytest.approx(ranked["sensitivity"])
    assert detail.loc[ranked["calibrator"], "rank"] == ranked["rank"]
    bins, _ = _chart_data(at, "bar")  # the first bar chart is the picked layer's histogram
    scales = Scales.load(Path(demo_run["out"]) / f"scales.{ranked['calibrator']}.json")
    assert int(bins["count"].sum()) == int(scales.statistics[ranked["layer"]].counts.sum())
    assert any(f"rank {ranked['rank']} of" in c.value for c in at.caption)


def test_clipped_values_are_counted_not_rounded(demo_store, demo_run):
    out = Path(demo_run["out"])
    at = open_page("layers")
    module = at.selectbox(key="layers-tensor").value
    table = _frame(at, "clipped values").set_index("calibrator")
    for name in ("entropy", "max", "mse", "percentile"):
        sc = Scales.load(out / f"scales.{name}.json")
        stats = sc.statistics[module]
        counts = stats.counts.tolist()
        clipped = summaries.clipped_count(counts, stats.bin_width, sc.get(module, "input").amax)
        assert table.loc[name, "clipped count"] == clipped
        assert table.loc[name, "clipped values"] == summaries.format_clipped(clipped, int(sum(counts)))
    assert table.loc["max", "clipped values"] == "0"


def test_comparing_runs_of_unrelated_models_warns(demo_run, monkeypatch, tmp_path):
    """A real compare run of another model (a small MLP on a CSV) beside the demo run: the page says they differ."""
    import torch
    from torch import nn

    from quantlab.data import load_data
    from quantlab.jobs.compare import run_compare

    copy_path = tmp_path / "runs.sqlite"
    with sqlite3.connect(demo_run["store"]) as src, sqlite3.connect(copy_path) as dst:
        src.backup(dst)
    csv = tmp_path / "table.csv"
    rows = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=rows)
    csv.write_text("a,b,c,label\n" + "".join(f"{a:.4f},{b:.4f},{c:.4f},{int(a > 0)}\n" for a, b, c in x.tolist()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    data = load_data(f"csv:{csv}", batch_size=32)
    outcome = run_compare(model, data, data, store=RunStore(copy_path), run_dir=tmp_path / "mlp",
                          describe={"model": "mlp.py:build", "data": f"csv:{csv}", "eval_data": f"csv:{csv}", "name": "mlp"},
                          metric="top1", calibrators=["max"], precisions=["fp32", "int8"])
    monkeypatch.setenv("QUANTLAB_STORE", str(copy_path))
    at = open_page("compare")
    at.selectbox(key="compare-run").set_value(demo_run["run"]["id"]).run()
    at.toggle(key="compare-side-by-side").set_value(True).run()
    no_exceptions(at)
    assert at.selectbox(key="compare-other").value == outcome.run_id
    warning = "\n".join(w.value for w in at.warning)
    assert "not comparable" in warning and "different models" in warning and "different eval data" in warning


def test_unrelated_reasons_same_and_different():
    a = {"model": "m.py:build", "eval_data": "csv:t.csv", "config": {"weights": "w1.pt"}}
    assert summaries.unrelated_reasons(a, dict(a)) == []
    assert "different models" in summaries.unrelated_reasons(a, dict(a, config={"weights": "w2.pt"}))[0]
    # another spec of the same architecture (same recorded layers) is the same model
    layers = {"0": "Conv2d 1→8 3×3"}
    assert summaries.unrelated_reasons(a, dict(a, model="copy.py:build"), layers_a=layers, layers_b=dict(layers)) == []
    reasons = summaries.unrelated_reasons(a, dict(a, model="other.py:build", eval_data="csv:u.csv"))
    assert len(reasons) == 2


def test_units_and_formats():
    assert summaries.format_value(93.3333, "top1") == "93.33 %"
    assert summaries.format_delta(-0.1, "top1") == "-0.10 points"
    assert summaries.format_value(12.3456, "perplexity") == "12.35"
    assert summaries.format_delta(0.25, "perplexity") == "+0.25"
    assert summaries.format_clipped(0, 1000) == "0"
    assert summaries.format_clipped(3, 1_200_000) == "3 of 1.2M (0.00025 %)"
    assert summaries.clipped_count([5, 4, 3, 2, 1], 1.0, 2.5) == 3  # bins 3 and 4 lie above 2.5
