"""2:4 + INT8 rows on the dashboard: labels, the speed summary, and the Compare page section."""
from __future__ import annotations

import pytest

from quantlab.store import RunStore
from quantlab.ui import summaries
from tests.ui.helpers import no_exceptions, open_page


def _rows(with_speed: bool):
    rows = [
        {"precision": "fp32", "calibrator": None, "source": "ptq", "metric": "top1", "value": 91.0, "delta": 0.0, "seconds": 1.0},
        {"precision": "fp16", "calibrator": None, "source": "ptq", "metric": "top1", "value": 91.0, "delta": 0.0, "seconds": 1.0},
        {"precision": "int8", "calibrator": "max", "source": "ptq", "metric": "top1", "value": 90.8, "delta": -0.2, "seconds": 1.0},
        {"precision": "int8", "calibrator": "max", "source": "sparse", "metric": "top1", "value": 86.5, "delta": -4.5, "seconds": 1.0},
    ]
    if with_speed:
        rows += [
            {"precision": "fp16", "calibrator": None, "source": "ptq", "metric": "latency_ms", "value": 3.0, "delta": None, "seconds": None},
            {"precision": "int8", "calibrator": "max", "source": "sparse", "metric": "latency_ms", "value": 1.2, "delta": None, "seconds": None},
        ]
    return rows


def test_labels_and_order_of_sparse_rows():
    assert summaries.series_label("int8", "max", "sparse") == "2:4 + INT8 max"
    assert summaries.series_label("int8", "entropy", "sparse-qat") == "2:4 + INT8 QAT (entropy)"
    frame = summaries.results_frame(_rows(False), "top1")
    assert list(frame["label"]) == ["FP32", "FP16", "INT8 max", "2:4 + INT8 max"]


@pytest.mark.parametrize("with_speed", [False, True])
def test_sparse_summary_carries_the_measured_speed_only_where_recorded(with_speed):
    table = summaries.sparse_summary(_rows(with_speed), "top1")
    assert list(table["label"]) == ["2:4 + INT8 max"] and table["delta"].iloc[0] == pytest.approx(-4.5)
    if with_speed:
        assert table["speedup_vs_fp16"].iloc[0] == pytest.approx(2.5) and table["latency_ms"].iloc[0] == pytest.approx(1.2)
    else:
        assert table["speedup_vs_fp16"].isna().all()


def test_compare_page_shows_the_2to4_row_with_accuracy_and_speed(empty_store):
    store = RunStore(empty_store)
    run_id = store.create_run("compare", model="examples/fmnist.py:build", data="fmnist:calib", eval_data="fmnist:test",
                              config={"metric": "top1", "sparsity": "2:4"})
    store.add_results(run_id, _rows(True))
    store.set_status(run_id, "done")
    at = open_page("compare")
    no_exceptions(at)
    section = next(e.value for e in at.dataframe if "speed-up vs FP16" in e.value.columns or "speedup_vs_fp16" in e.value.columns)
    row = section.iloc[0]
    assert row["configuration"] == "2:4 + INT8 max" and row["top1"] == pytest.approx(86.5)
    assert row.get("speedup_vs_fp16", row.get("speed-up vs FP16")) == pytest.approx(2.5)
    assert any("2:4 structured sparsity + INT8" in h.value for h in at.subheader)
    assert "2:4 + INT8 max" in set(next(e.value for e in at.dataframe if "Δ vs FP32" in e.value.columns and "verdict" in e.value.columns)["configuration"])
