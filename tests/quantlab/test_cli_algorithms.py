"""``--algorithms`` / ``--algorithm-param`` on the CLI, ``quantlab algorithms``, and what calibrate writes with them."""
import json

import pytest

from quantlab.algorithms import AlgorithmError, check_params, parse_param_items, parse_value
from quantlab.checkpoint import read_checkpoint
from quantlab.cli.main import main
from quantlab.scales import Scales
from tests import ptq_algorithms

MODEL = "quantlab.models.fmnist:pretrained_fmnist_cnn"


@pytest.fixture
def algorithms(monkeypatch):
    ptq_algorithms.register(monkeypatch)


def _calibrate(out, *extra):
    return ["calibrate", "--model", MODEL, "--data", "fmnist:calib[:256]", "--batch-size", "128", "--device", "cpu",
            "--calibrators", "max,percentile", "--out", str(out), *extra]


def test_values_are_typed():
    assert parse_value("200") == 200 and isinstance(parse_value("200"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("off") is False
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("layer.*") == "layer.*"
    with pytest.raises(AlgorithmError, match="finite"):
        parse_value("nan")


def test_params_are_checked_against_the_declared_ones(algorithms):
    items = parse_param_items(["test-rescale.factor=3", "test-nudge.anything=x"])
    assert items == {"test-rescale": {"factor": 3}, "test-nudge": {"anything": "x"}}
    typed = check_params("test-rescale,test-nudge", items)
    assert typed["test-rescale"]["factor"] == 3.0 and isinstance(typed["test-rescale"]["factor"], float)
    with pytest.raises(AlgorithmError, match="must be a number"):
        check_params("test-rescale", {"test-rescale": {"factor": "big"}})
    with pytest.raises(AlgorithmError, match="unknown parameter 'iterations' of algorithm 'test-rescale'; its parameters: factor"):
        check_params("test-rescale", {"test-rescale": {"iterations": 3}})
    with pytest.raises(AlgorithmError, match="not among the selected algorithms"):
        check_params("test-rescale", {"test-nudge": {"x": 1}})


@pytest.mark.parametrize("extra, message", [
    (["--algorithms", "test-rescale,nope"], "unknown algorithm 'nope'; known algorithms: .*test-rescale"),
    (["--algorithms", "test-rescale", "--algorithm-param", "factor=2"], "must look like ALGORITHM.NAME=VALUE"),
    (["--algorithms", "test-rescale", "--algorithm-param", "test-rescale.iterations=2"], "unknown parameter 'iterations'"),
    (["--algorithms", "test-rescale", "--algorithm-param", "test-nudge.x=2"], "not among the selected algorithms"),
    (["--algorithm-param", "nope.x=1"], "unknown algorithm 'nope'"),
])
def test_bad_algorithm_flags_are_one_line_errors_before_any_work(algorithms, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(_calibrate(out, *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantlab calibrate: error: ") and "\n" not in err
    import re

    assert re.search(message, err), err
    assert not out.exists()  # refused before the folder was made


@pytest.mark.parametrize("param, message", [
    ("bias-correction.mode=foo", "bias-correction: mode must be one of empirical, weights, got 'foo'"),
    ("adaround.warm_start=1.5", "adaround: warm_start must be below 1, got 1.5"),
    ("adaround.iterations=0", "adaround: iterations must be a positive integer, got 0"),
    ("adaround.iterations=1000000", "adaround: iterations must be at most 100000 per layer, got 1000000"),
    ("cle.relu6=sometimes", "cle: relu6 must be one of"),
    ("cle.iterations=1.5", "cle.iterations must be an integer"),
    ("bn-fold.x=1", "unknown parameter 'x' of algorithm 'bn-fold'; its parameters: none"),
])
def test_built_in_algorithms_refuse_bad_values_before_any_stage_runs(tmp_path, capsys, monkeypatch, param, message):
    # Each value was refused only when its algorithm ran: a bad bias-correction mode after the
    # statistics pass and the whole of AdaRound. Now no stage runs at all.
    import importlib

    pipeline = importlib.import_module("quantlab.pipeline.run")  # the module (the package exports a function "run")
    ran = []
    monkeypatch.setattr(pipeline, "transform", lambda *a, **k: ran.append("transform"))
    monkeypatch.setattr(pipeline, "collect", lambda *a, **k: ran.append("collect"))
    out = tmp_path / "out"
    assert main(_calibrate(out, "--algorithms", "bn-fold,cle,adaround,bias-correction", "--algorithm-param", param)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantlab calibrate: error: ") and "\n" not in err and message in err, err
    assert ran == [] and not out.exists()


@pytest.mark.parametrize("command", ["compare", "qat"])
def test_compare_and_qat_refuse_unknown_algorithms_too(algorithms, tmp_path, capsys, command):
    args = [command, "--model", MODEL, "--data", "fmnist:calib[:64]", "--eval", "fmnist:test[:64]", "--out", str(tmp_path / "o"),
            "--algorithms", "nope"]
    assert main(args) == 1
    assert "unknown algorithm 'nope'" in capsys.readouterr().err


def test_algorithms_command_lists_stage_and_description(algorithms, capsys):
    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "test-rescale" in l)
    assert "transform" in line and "factor=2.0" in line and "test: rescale BN/conv pairs" in line
    nudge = next(l for l in out.splitlines() if "test-nudge" in l)
    assert "refine" in nudge and "yes" in nudge
    assert out.index("test-rescale") < out.index("test-nudge")  # pipeline order


def test_calibrate_with_algorithms_writes_checkpoints_and_records_them(algorithms, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_calibrate(out, "--algorithms", "test-nudge,test-rescale", "--algorithm-param", "test-rescale.factor=4")) == 0
    assert "transform test-rescale" in capsys.readouterr().out
    summary = json.loads((out / "calibration.json").read_text())
    assert set(summary["checkpoints"]) == {"max", "percentile"}
    assert [r["name"] for r in summary["algorithms"]["transforms"]] == ["test-rescale"]
    scales = Scales.load(out / "scales.max.json")
    assert scales.config.algorithms == ("test-rescale", "test-nudge")
    assert scales.config.params_of("test-rescale") == {"factor": 4.0}
    info, _ = read_checkpoint(out / "model.max.safetensors", tensors=False)
    assert info.algorithms() == ["test-rescale", "test-nudge"] and info.transforms[0]["details"]["factor"] == 4.0


def test_compare_with_algorithms_and_a_checkpoint_row(algorithms, tmp_path, capsys):
    ptq = tmp_path / "ptq"
    assert main(_calibrate(ptq, "--algorithms", "test-clamp,test-nudge")) == 0
    out = tmp_path / "run"
    args = ["compare", "--model", MODEL, "--data", "fmnist:calib[:256]", "--eval", "fmnist:test[:128]", "--batch-size", "128",
            "--calibrators", "max", "--precisions", "fp32,int8", "--layer-batches", "0", "--store", str(tmp_path / "runs.sqlite"),
            "--algorithms", "test-rescale", "--checkpoint", str(ptq / "model.max.safetensors"), "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "INT8 max (ptq+test-rescale)" in printed and "INT8 max (ptq+test-clamp+test-nudge)" in printed
    results = json.loads((out / "results.json").read_text())
    sources = [r["source"] for r in results["rows"] if r["precision"] == "int8" and r["metric"] == "top1"]
    assert sources == ["ptq", "ptq+test-rescale", "ptq+test-clamp+test-nudge"]
    assert json.loads((out / "run.json").read_text())["checkpoint"] == str(ptq / "model.max.safetensors")
