"""compare() from Python on the planted MLP: plugged-in runners; measuring records nothing (tests/jobs: the job)."""
import copy

import pytest
import torch

from quantlab.api import load_scales
from quantlab.evaluation.compare import Candidate, compare
from quantlab.evaluation.errors import EvaluationError


def test_extra_candidates_are_evaluated_like_the_rest(planted):
    model, calib, evaluation = planted

    def traced_int8(ptq):
        quant = load_scales(copy.deepcopy(model), ptq.scales["max"])
        scripted = torch.jit.trace(quant.eval(), evaluation[0][0])
        return [Candidate(precision="int8", calibrator="max", source="qat", model=scripted)]

    result = compare(model, calib, evaluation, calibrators="max", precisions="fp32,int8", extra_candidates=traced_int8)
    rows = {(r.precision, r.source): r.value for r in result.primary_rows()}
    assert rows[("int8", "qat")] == pytest.approx(rows[("int8", "ptq")])  # the same INT8 model, run through TorchScript
    assert result.run_id is None and result.run_dir is None


def test_measuring_records_nothing_and_reports_through_callbacks(planted, tmp_path, monkeypatch):
    model, calib, evaluation = planted
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    monkeypatch.chdir(tmp_path)
    events = []
    result = compare(model, calib, evaluation, calibrators="max,percentile", precisions="fp32,int8", layer_batches=1,
                     on_reference=lambda settings: events.append(("reference", settings["calibrators"])),
                     on_rows=lambda rows, fraction: events.append(("rows", rows[0].precision, fraction)),
                     on_layers=lambda calibrator, errors: events.append(("layers", calibrator, len(errors))))
    assert events == [("reference", ["max", "percentile"]), ("rows", "fp32", pytest.approx(1 / 3)),
                      ("rows", "int8", pytest.approx(2 / 3)), ("layers", "max", 4), ("rows", "int8", 1.0), ("layers", "percentile", 4)]
    assert result.settings["precisions"] == ["fp32", "int8"] and result.run_id is None
    assert list(tmp_path.iterdir()) == []  # no store, no run folder
    wrong = [(torch.randn(8, 17), torch.zeros(8, dtype=torch.long))]  # the model takes 16 features
    with pytest.raises(EvaluationError):
        compare(model, calib, wrong, on_reference=lambda settings: events.append("again"))
    assert events[-1] != "again"
