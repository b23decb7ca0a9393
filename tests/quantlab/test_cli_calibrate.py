"""``quantlab calibrate``: one process, and under torchrun with 2 CPU processes (gloo)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from quantlab.cli.main import main
from quantlab.scales import Scales

MODEL = "tests/qat/models.py:tiny_cnn"
CALIBRATORS = ("max", "percentile", "entropy", "mse")


def _args(out, *extra):
    # 7 of the 10 batches: an odd count, so the two ranks get 4 and 3.
    return ["calibrate", "--model", MODEL, "--data", "fmnist:calib[:640]", "--batch-size", "64",
            "--max-batches", "7", "--device", "cpu", "--out", str(out), *extra]


def _torchrun(args, nproc, tmp_path):
    with socket.socket() as sock:  # a free port (torchrun's static rendezvous cannot use 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTLAB_STORE": str(tmp_path / "runs.sqlite")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           "-m", "quantlab", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(_args(out)) == 0
    return out


def test_one_process_writes_every_calibrator_and_a_summary(one_process):
    summary = json.loads((one_process / "calibration.json").read_text())
    assert summary["num_batches"] == 7 and summary["world_size"] == 1
    assert set(summary["scales"]) == set(CALIBRATORS)
    for name in CALIBRATORS:
        scales = Scales.load(one_process / f"scales.{name}.json")
        assert scales.calibrator == name and scales.statistics
    assert not [p for p in one_process.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_two_ranks_give_bit_identical_histograms_and_equal_ranges(one_process, tmp_path):
    done = _torchrun(_args(tmp_path / "two"), 2, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("statistics pass: 7 batches on 2 ranks") == 1  # rank 0 alone prints and writes
    summary = json.loads((tmp_path / "two" / "calibration.json").read_text())
    assert summary["num_batches"] == 7 and summary["world_size"] == 2
    for name in CALIBRATORS:
        one = Scales.load(one_process / f"scales.{name}.json")
        two = Scales.load(tmp_path / "two" / f"scales.{name}.json")
        assert one.statistics.keys() == two.statistics.keys()
        for module, stats in one.statistics.items():
            theirs = two.statistics[module]
            assert stats.counts.equal(theirs.counts), (name, module)
            assert (stats.bin_width, stats.amax) == (theirs.bin_width, theirs.amax), (name, module)
        assert {e.key: e.amax for e in one.entries} == {e.key: e.amax for e in two.entries}, name


def test_bad_calibrator_name_is_refused_before_any_work(tmp_path, capsys):
    assert main(_args(tmp_path / "bad", "--calibrators", "max,kl")) != 0
    assert "kl" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
