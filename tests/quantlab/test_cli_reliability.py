"""Issue 15 at the command line: one-line errors (class 5), runs that say what happened (class 3)."""
import hashlib
import os
import shutil
import signal

import numpy as np
import pytest

from quantlab.cli.main import main
from quantlab.store import RunLock, RunStore

MODEL = "tests/qat/models.py:tiny_cnn"
QAT = ["--data", "fmnist:train[:64]", "--eval", "fmnist:test[:32]", "--batch-size", "32", "--max-steps", "2",
       "--calib-batches", "1", "--calibrator", "max"]


def _err(capsys):
    """quantlab's own stderr lines (progress bars of `datasets` aside); never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return "".join(line + "\n" for line in err.replace("\r", "\n").splitlines() if line.startswith(("quantlab", "usage", " ")))


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("device, message", [("banana", "'banana' is not a device"), ("cuda:7", "cuda:7")])
def test_bad_devices_fail_before_anything(device, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, exit 2
        main(["calibrate", "--model", MODEL, "--data", "fmnist:calib", "--out", str(tmp_path / "o"), "--device", device])
    assert exit_info.value.code == 2
    assert message in _err(capsys) and not (tmp_path / "o").exists()


def test_model_specs_that_fail_say_why(tmp_path, capsys):
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    factory_exits = tmp_path / "factory.py"
    factory_exits.write_text("import sys\ndef build():\n    sys.exit('no GPU')\n")
    cases = [
        (f"{exits}:build", "called sys.exit(3)"),
        (f"{factory_exits}:build", "called sys.exit('no GPU')"),
        (str(tmp_path / "missing.pt"), "model file not found"),
        (str(tmp_path / "missing.py"), "model file not found"),
        (str(exits), "names no factory"),
    ]
    for spec, message in cases:
        assert main(["calibrate", "--model", spec, "--data", "fmnist:calib[:64]", "--out", str(tmp_path / "o")]) == 1, spec
        err = _err(capsys)
        assert err.count("\n") == 1 and message in err, (spec, err)


def test_data_that_does_not_fit_is_named_with_sample_and_shapes(tmp_path, capsys):
    wide = tmp_path / "wide.csv"
    wide.write_text("a,b,c,label\n" + "".join(f"{i},{i + 1},{i + 2},{i % 2}\n" for i in range(8)))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n7,8\n")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("a,b,c,label\n1,2,3,0\n4,x,6,1\n7,8,9,0\n")
    images = tmp_path / "images"
    from PIL import Image

    for cls, size in (("a", 28), ("b", 32)):
        (images / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((size, size), dtype=np.uint8)).save(images / cls / "0.png")
    corrupt = tmp_path / "corrupt"
    (corrupt / "a").mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(corrupt / "a" / "0.png")
    (corrupt / "a" / "1.png").write_bytes((corrupt / "a" / "0.png").read_bytes()[:200])  # cut mid-pixels
    cases = [
        (f"csv:{wide}", ["does not fit the model", "inputs (2, 3)", "layer 'stem.0' (Conv2d)", "1 channels"]),
        (f"csv:{ragged}", ["sample 2", "no value in column(s) c"]),
        (f"csv:{mixed}", ["column 'b' mixes numbers and text", "row 1"]),
        (f"imagefolder:{images}", ["sample 1", "32x32 pixels", "28x28"]),
        (f"imagefolder:{corrupt}", ["sample 1", "truncated"]),
    ]
    for spec, messages in cases:
        assert main(["calibrate", "--model", MODEL, "--data", spec, "--out", str(tmp_path / "o")]) == 1, spec
        err = _err(capsys)
        assert err.count("\n") == 1 and all(m in err for m in messages), (spec, err)
        assert spec.split(":", 1)[1] in err


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import quantlab.ptq as ptq

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(ptq, "run_ptq", bug)
    args = ["calibrate", "--model", MODEL, "--data", "fmnist:calib[:64]", "--out", str(tmp_path / "o")]
    assert main(args) == 70
    err = _err(capsys)
    assert err.count("\n") == 1 and "internal error: TypeError: unsupported operand" in err and "--debug" in err
    with pytest.raises(TypeError):
        main(["--debug", *args])
    with pytest.raises(TypeError):
        main(["-v", *args])


def test_sigterm_records_the_run_interrupted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    import quantlab.export.qdq as qdq

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this process mid-export

    monkeypatch.setattr(qdq, "export_int8", terminated)
    scales = tmp_path / "s"
    assert main(["calibrate", "--model", MODEL, "--data", "fmnist:calib[:64]", "--calibrators", "max", "--out", str(scales)]) == 0
    code = main(["export", "--model", MODEL, "--scales", str(scales / "scales.max.json"), "--input-shape", "1,28,28",
                 "--out", str(tmp_path / "m.onnx")])
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in _err(capsys)
    (run,) = RunStore(tmp_path / "runs.sqlite").list_runs(kind="export")
    assert run["status"] == run["recorded_status"] == "interrupted" and "SIGTERM" in run["error"]


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    out = tmp_path / "cmp"
    with RunLock(out, "quantlab compare"):  # the first run, still working
        assert main(["compare", "--model", MODEL, "--data", "fmnist:calib[:64]", "--eval", "fmnist:test[:64]",
                     "--calibrators", "max", "--out", str(out)]) == 1
    err = _err(capsys)
    assert err.count("\n") == 1 and f"being written by quantlab compare (pid {os.getpid()}" in err
    assert RunStore(tmp_path / "runs.sqlite").list_runs() == []  # refused before anything was recorded


def test_qat_resume_of_a_finished_run_is_refused_and_records_nothing(tmp_path, capsys, monkeypatch):
    store_path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QUANTLAB_STORE", str(store_path))
    out = tmp_path / "qat"
    assert main(["qat", "--model", MODEL, *QAT, "--out", str(out)]) == 0
    capsys.readouterr()
    store = RunStore(store_path)
    before = [(r["id"], r["status"], r["updated_at"]) for r in store.list_runs()]
    copy = tmp_path / "copied"
    shutil.copytree(out, copy)  # a copied run folder: its run id is in the store, it is just as finished
    for folder in (out, copy):
        files = _snapshot(folder)
        assert main(["qat", "--model", MODEL, *QAT, "--out", str(folder), "--resume"]) == 1
        err = _err(capsys)
        assert err.count("\n") == 1 and "finished" in err and "nothing to resume" in err
        assert _snapshot(folder) == files
    assert [(r["id"], r["status"], r["updated_at"]) for r in store.list_runs()] == before
