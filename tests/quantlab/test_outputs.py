"""Class 2 of issue 15: every output path is checked before any work; no input is ever overwritten."""
import os

import pytest
import torch

import quantlab as ql
from quantlab._io import write_text_atomic
from quantlab.cli.main import main
from quantlab.errors import OutputPathError
from quantlab.export.cache import write_calibration_cache
from quantlab.outputs import ONNX_FILE, check_output_file, same_file

MODEL = "tests/qat/models.py:tiny_cnn"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A scales file and the FP32 ONNX of the tiny CNN (real files, made once)."""
    from tests.qat.models import tiny_cnn

    folder = tmp_path_factory.mktemp("inputs")
    model = tiny_cnn().eval()
    batches = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ql.quantize(model, ql.int8_config(), forward_loop=lambda m: [m(b) for b in batches])
    scales = ql.calibrate(model, "max").save(folder / "scales.max.json")
    assert main(["export", "--model", MODEL, "--precision", "fp32", "--input-shape", "1,28,28", "--out", str(folder / "fp32.onnx")]) == 0
    return {"scales": scales, "onnx": folder / "fp32.onnx"}


def _snapshot(*paths):
    return {p: p.read_bytes() for p in paths}


def test_cache_out_equal_to_onnx_is_refused_even_through_a_symlink(files, tmp_path, capsys):
    before = _snapshot(files["onnx"], files["scales"])
    link = tmp_path / "link.onnx"
    link.symlink_to(files["onnx"])
    hard = tmp_path / "hard.onnx"
    os.link(files["onnx"], hard)
    for out in (files["onnx"], link, hard, files["scales"]):
        assert main(["cache", "--scales", str(files["scales"]), "--onnx", str(files["onnx"]), "--trt-version", "8.6.1",
                     "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "same file as" in err and "destroy the input" in err
    assert _snapshot(files["onnx"], files["scales"]) == before
    with pytest.raises(OutputPathError, match="same file as --onnx"):
        write_calibration_cache(files["scales"], files["onnx"], link, trt_version="8.6.1")


def test_export_never_overwrites_its_inputs_and_checks_before_loading(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUANTLAB_STORE", raising=False)
    import quantlab.model_source as model_source

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(model_source, "load_model", never)
    before = _snapshot(files["scales"])
    model_file = tmp_path / "model.py"
    model_file.write_text("from tests.qat.models import tiny_cnn as build\n")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    cases = [
        (["--scales", str(files["scales"]), "--out", str(files["scales"])], "same file as --scales"),
        (["--scales", str(files["scales"]), "--out", str(model_file)], "same file as --model"),
        (["--scales", str(files["scales"]), "--out", str(a_folder)], "is a folder"),
        (["--scales", str(files["scales"]), "--out", str(notes)], "exists and is not an .onnx model"),
        (["--scales", str(files["scales"]), "--out", str(notes / "m.onnx")], "is a file, not a folder"),
        # The sidecar <out>.json would be the scales file itself.
        (["--scales", str(files["scales"]), "--out", str(files["scales"])[: -len(".json")]], "sidecar"),
    ]
    for extra, message in cases:
        assert main(["export", "--model", f"{model_file}:build", "--input-shape", "1,28,28", *extra]) == 1, message
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (message, err)
    assert _snapshot(files["scales"]) == before and notes.read_text() == "mine"


def test_existing_onnx_is_replaced_and_unwritable_places_are_refused(tmp_path, monkeypatch):
    old = tmp_path / "m.onnx"
    old.write_bytes(b"old")
    assert check_output_file(old, replace=ONNX_FILE) == old  # same kind: export may replace it
    with pytest.raises(OutputPathError, match="does not replace files"):
        check_output_file(old)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(OutputPathError, match="permission denied"):
        check_output_file(tmp_path / "new.onnx", replace=ONNX_FILE)
    assert same_file(old, tmp_path / "." / "m.onnx")


def test_run_folder_outputs_are_checked_before_any_work(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    calib = ["calibrate", "--model", MODEL, "--data", "fmnist:calib[:64]", "--max-batches", "1", "--calibrators", "max"]
    for out, message in ((project, "quantlab did not write"), (afile, "is a file")):
        assert main([*calib, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert (project / "train.py").read_text() == "print('mine')\n" and afile.read_text() == "x"
    # An input inside the folder that would be replaced as a whole.
    run = tmp_path / "run"
    assert main([*calib, "--out", str(run)]) == 0
    (run / "extra.json").write_text("{}")
    assert main([*calib, "--weights", str(run / "extra.json"), "--out", str(run)]) == 1
    assert "holds --weights" in capsys.readouterr().err


def test_report_out_equal_to_a_run_file_is_refused(tmp_path):
    from quantlab.jobs.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    with pytest.raises(OutputPathError, match="same file as the run's results.json"):
        write_report(run, run / "results.json")


def test_atomic_writes_refuse_a_folder_with_an_oserror_naming_it(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_text_atomic(tmp_path, "x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="a file stands where a folder"):
        write_text_atomic(tmp_path / "f" / "g.json", "x")


def test_build_checks_the_plan_path_before_tensorrt(files, tmp_path, capsys):
    assert main(["build", str(files["onnx"]), "--out", str(files["onnx"])]) == 1
    err = capsys.readouterr().err
    assert "same file as the ONNX model" in err
