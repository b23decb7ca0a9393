"""The plain shaping functions behind the pages (prediction, histograms, ordering)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from quantlab.ui import summaries
from quantlab.ui.charts import PALETTE, series_color


def _ranking(sensitivity, sqnr):
    return pd.DataFrame({"layer": [f"l{i}" for i in range(len(sqnr))], "sensitivity": sensitivity, "sqnr_db": sqnr})


def test_predicted_effect_adds_sensitivities_and_never_beats_fp32():
    ranking = _ranking([0.6, 0.3, -0.1], [10.0, 20.0, 30.0])
    one = summaries.predicted_effect(ranking, ["l0"], int8_delta=-1.0, higher=True)
    assert one["basis"] == "sensitivity" and one["predicted_delta"] == pytest.approx(-0.4)
    both = summaries.predicted_effect(ranking, ["l0", "l1", "l2"], int8_delta=-1.0, higher=True)
    assert both["predicted_delta"] == pytest.approx(-0.1)  # negative sensitivities recover nothing
    capped = summaries.predicted_effect(ranking, ["l0", "l1"], int8_delta=-0.5, higher=True)
    assert capped["predicted_delta"] == pytest.approx(0.0)
    # lower-is-better metric (perplexity): INT8 is +2 worse, the layer recovers 1.5
    ppl = summaries.predicted_effect(_ranking([1.5, None, None], [5.0, 9.0, 9.0]), ["l0"], int8_delta=2.0, higher=False)
    assert ppl["predicted_delta"] == pytest.approx(0.5)


def test_predicted_effect_falls_back_to_the_sqnr_noise_share():
    ranking = _ranking([None, None], [10.0, 20.0])  # noise powers 0.1 and 0.01
    out = summaries.predicted_effect(ranking, ["l0"], int8_delta=-1.1, higher=True)
    assert out["basis"] == "SQNR noise share"
    assert out["noise_share"] == pytest.approx(0.1 / 0.11)
    assert out["predicted_delta"] == pytest.approx(-1.1 * (1 - 0.1 / 0.11))


def test_histogram_frame_merges_bins_and_keeps_every_count():
    counts = [5, 0, 3, 0, 0, 7, 1] + [0] * 10
    frame = summaries.histogram_frame(counts, 0.5, max_bars=3)
    assert frame["count"].sum() == sum(counts)
    assert frame["left"].iloc[0] == 0.0 and frame["right"].iloc[-1] == pytest.approx(7 * 0.5)  # ends at the data
    assert len(frame) <= 3
    assert summaries.clipped_fraction(counts, 0.5, 1.2) == pytest.approx(8 / 16)  # bins from 1.5 up are clipped


def test_runs_frame_nests_child_runs_and_finds_the_best_int8():
    runs = [
        {"id": "c2", "kind": "export", "status": "done", "parent_id": "p", "model": "m", "name": "export"},
        {"id": "c1", "kind": "sensitivity", "status": "done", "parent_id": "p", "model": "m", "name": "sens"},
        {"id": "p", "kind": "compare", "status": "done", "parent_id": None, "model": "m", "name": "demo"},
    ]
    results = {"p": [
        {"precision": "fp32", "calibrator": None, "source": "ptq", "metric": "perplexity", "value": 10.0, "delta": 0.0},
        {"precision": "int8", "calibrator": "max", "source": "ptq", "metric": "perplexity", "value": 12.0, "delta": 2.0},
        {"precision": "int8", "calibrator": "mse", "source": "ptq", "metric": "perplexity", "value": 10.5, "delta": 0.5},
    ]}
    frame = summaries.runs_frame(runs, results)
    assert list(frame["id"]) == ["p", "c1", "c2"]
    assert list(frame["name"]) == ["demo", "↳ sens", "↳ export"]
    assert frame.loc[0, "best INT8"] == "INT8 mse" and frame.loc[0, "best INT8 Δ"] == 0.5  # lower perplexity wins
    assert math.isnan(frame.loc[1, "FP32"])


def test_one_colour_per_series_everywhere():
    assert series_color("entropy") == PALETTE["entropy"] == series_color(summaries.series_key("int8", "entropy"))
    assert series_color(summaries.series_key("fp32", None, "qat")) == PALETTE["fp32"]
    assert series_color("my_calibrator") == series_color("my_calibrator")  # stable for user calibrators
    assert summaries.series_label("int8", "entropy", "qat") == "INT8 QAT (entropy)"


def test_ranking_without_metric_orders_by_the_per_token_proxy_then_falls_back():
    rows = [
        # b's global SQNR looks fine but its per-token SQNR (the proxy) is the worst: it must come first.
        {"calibrator": "mse", "layer": "a", "sqnr_db": 20.0, "local_sqnr_db": 21.0, "local_row_sqnr_db": 18.0},
        {"calibrator": "mse", "layer": "b", "sqnr_db": 35.0, "local_sqnr_db": 35.0, "local_row_sqnr_db": 0.3},
        {"calibrator": "mse", "layer": "c", "sqnr_db": 10.0, "local_sqnr_db": None, "local_row_sqnr_db": None},  # older run
    ]
    frame = summaries.layers_frame(rows)
    assert {"row_sqnr_db", "local_row_sqnr_db"} <= set(frame.columns)
    assert list(summaries.sensitivity_ranking(frame, "mse")["layer"]) == ["b", "c", "a"]
