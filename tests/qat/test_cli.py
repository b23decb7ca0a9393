"""``quantlab qat`` end to end on Fashion-MNIST subsets: results in the run store, interrupt and resume."""
import json
import os
import socket
import subprocess
import sys

import pytest

from quantlab.cli.main import main
from quantlab.store import RunStore

MODEL = "tests/qat/models.py:tiny_cnn"


def _args(out, *extra):
    return ["qat", "--model", MODEL, "--data", "fmnist:train[:384]", "--eval", "fmnist:test[:256]",
            "--out", str(out), "--max-steps", "6", "--checkpoint-every", "3", "--lr", "3e-3", "--batch-size", "32",
            "--calibrator", "max", "--calib-batches", "2", "--fold-bn", "--learn-amax", *extra]


def test_cli_records_the_run_and_resumes_after_an_interruption(tmp_path, monkeypatch, capsys):
    store_path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QUANTLAB_STORE", str(store_path))
    out = tmp_path / "run"
    import quantlab.qat.run as run_module

    real_train = run_module.train

    def interrupted_train(*args, progress=None, **kwargs):
        def stop_at_4(p):
            progress(p)
            if p.step == 4:
                raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 3

        return real_train(*args, progress=stop_at_4, **kwargs)

    monkeypatch.setattr(run_module, "train", interrupted_train)
    assert main(_args(out)) == 130
    store = RunStore(store_path)
    (first,) = store.list_runs(kind="qat")
    assert first["status"] == "interrupted" and "interrupted" in first["error"]
    monkeypatch.setattr(run_module, "train", real_train)

    assert main(_args(out, "--resume")) == 0
    printed = capsys.readouterr().out
    assert "resumed from step 3" in printed and "| int8" in printed
    # The resumed run is a new record, child of the interrupted one, which is never rewritten.
    run, again = store.list_runs(kind="qat")
    assert again["id"] == first["id"] and again["status"] == "interrupted"
    assert run["status"] == "done" and run["parent_id"] == first["id"]
    rows = {(r["precision"], r["source"]): r for r in store.results(run["id"])}
    assert set(rows) == {("fp32", "qat"), ("int8", "ptq"), ("int8", "qat")}
    assert rows[("int8", "ptq")]["calibrator"] == "max" and rows[("int8", "qat")]["metric"] == "top1"
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 6 and summary["qat"] == pytest.approx(rows[("int8", "qat")]["value"])
    assert rows[("int8", "qat")]["delta"] == pytest.approx(summary["qat"] - summary["fp32"])
    kinds = {a["kind"] for a in store.artifacts(run["id"])}
    assert {"scales", "checkpoint"} <= kinds
    for name in ("scales.json", "model.pt", "qat.json", "checkpoint.pt", "scales.start.json"):
        assert (out / name).is_file(), name


def test_cli_bad_scales_and_changed_schedule_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTLAB_STORE", str(tmp_path / "runs.sqlite"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "quantlab.scales", "version": 1, "quantizers": [
        {"module": "encoder.layer0", "role": "input", "amax": 1.0}]}))
    assert main(_args(tmp_path / "a", "--scales", str(wrong))) == 1
    err = capsys.readouterr().err
    assert "quantlab qat: error:" in err and "encoder.layer0" in err
    assert main(_args(tmp_path / "b", "--no-store", "--resume")) == 1
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_under_torchrun_two_processes(tmp_path):
    env = {**os.environ, "QUANTLAB_STORE": str(tmp_path / "runs.sqlite"), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port (torchrun's static rendezvous cannot use 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "quantlab", *_args(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| int8") == 2  # printed once, by rank 0
    summary = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and len(summary["losses"]) == 6
    (run,) = RunStore(tmp_path / "runs.sqlite").list_runs(kind="qat")
    assert run["status"] == "done"
