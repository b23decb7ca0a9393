"""Kill tests: calibrate, compare and qat killed (SIGKILL or SIGTERM) at seeded random moments.

Each case writes a complete run A into a folder, starts run B (other settings) on the same folder
in a subprocess and kills it at a random moment: either a random time after its start, or a random
few milliseconds after its staging folder appears (the commit window, where a kill would mix files).
Afterwards the folder must be exactly A, or a complete B, and the store must not say "running".
"""
import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantlab.cli.main import main
from quantlab.scales import Scales
from quantlab.store import RunFolder, RunStore, read_manifest

MODEL = "tests/qat/models.py:tiny_cnn"
ROOT = Path(__file__).resolve().parents[2]

COMMANDS = {
    "calibrate": lambda out, cal: ["calibrate", "--model", MODEL, "--data", "fmnist:calib[:128]", "--batch-size", "32",
                                   "--max-batches", "2", "--calibrators", cal, "--device", "cpu", "--out", str(out)],
    "compare": lambda out, cal: ["compare", "--model", MODEL, "--data", "fmnist:calib[:128]", "--eval", "fmnist:test[:64]",
                                 "--batch-size", "32", "--max-batches", "2", "--calibrators", cal, "--precisions", "fp32,int8",
                                 "--layer-batches", "1", "--out", str(out)],
    "qat": lambda out, cal: ["qat", "--model", MODEL, "--data", "fmnist:train[:128]", "--eval", "fmnist:test[:64]",
                             "--batch-size", "32", "--max-steps", "4", "--checkpoint-every", "2", "--calib-batches", "1",
                             "--calibrator", cal, "--out", str(out)],
}
OLD_CAL = {"calibrate": "max", "compare": "max", "qat": "max"}
NEW_CAL = {"calibrate": "max,percentile", "compare": "max,percentile", "qat": "percentile"}


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_complete_new(kind: str, folder: Path) -> str:
    """The folder is one whole run B (its manifest lists exactly what is there); returns its state."""
    manifest = read_manifest(folder)
    assert manifest is not None, "a folder that is not A must be a committed B"
    present = {k for k in snapshot(folder) if k != "quantlab-run.json"}
    listed = set(manifest["files"])
    if kind == "qat" and manifest["state"] == "training":
        assert listed <= present <= listed | {"checkpoint.pt"}  # checkpoints land after the first commit
        assert json.loads((folder / "run.json").read_text())["qat"] is None
        return "training"
    assert present == listed, (present, listed)
    if kind == "calibrate":
        summary = json.loads((folder / "calibration.json").read_text())
        assert sorted(summary["scales"]) == ["max", "percentile"]
        for name in summary["scales"]:
            Scales.load(folder / f"scales.{name}.json")
    elif kind == "compare":
        results = json.loads((folder / "results.json").read_text())
        assert sorted(results["scales"]) == ["max", "percentile"]
    else:
        assert manifest["state"] == "done" and (folder / "qat.json").is_file()
        assert json.loads((folder / "run.json").read_text())["calibrator"] == "percentile"
    return manifest["state"]


def run_and_kill(args, env, rng: random.Random, out: Path, commits: int = 1):
    """Starts the CLI, kills it at a seeded random moment; returns (signal, returncode, stderr).

    The moment: a random time after the start (imports, statistics, evaluation, training), or a
    random 0-300 ms after the k-th staging folder appears (k <= ``commits``): mid-write, mid-swap,
    or between the commit and the store's record.
    """
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    proc = subprocess.Popen([sys.executable, "-m", "quantlab", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.5, 8.0))
    else:
        pattern = str(out.parent / f".{out.name}.staging-*")
        wanted, seen, current = rng.randint(1, commits), 0, set()
        while proc.poll() is None and seen < wanted and time.monotonic() - start < 120:
            found = set(glob.glob(pattern))
            seen += len(found - current)
            current = found
            time.sleep(0.001)
        time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.02), rng.uniform(0.0, 0.3)]))
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return sig, proc.returncode, err.decode(errors="replace")


def kill_case(kind: str, seed: int, tmp_path: Path, monkeypatch):
    store_path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QUANTLAB_STORE", str(store_path))
    out = tmp_path / "run"
    assert main(COMMANDS[kind](out, OLD_CAL[kind])) == 0
    old = snapshot(out)
    store = RunStore(store_path)
    before = {r["id"] for r in store.list_runs()}
    env = {**os.environ, "QUANTLAB_STORE": str(store_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sig, code, err = run_and_kill(COMMANDS[kind](out, NEW_CAL[kind]), env, random.Random(seed), out,
                                  commits=2 if kind == "qat" else 1)
    assert "Traceback" not in err, err[-2000:]
    now = snapshot(out)
    state = "old" if now == old else assert_complete_new(kind, out)
    # The store: nothing of B is "running"; a SIGTERMed B recorded itself interrupted.
    new_runs = [r for r in store.list_runs() if r["id"] not in before]
    for run in new_runs:
        assert run["status"] in ("done", "interrupted"), run
        if code == 0:
            assert run["status"] == "done"
        elif sig == signal.SIGTERM and code == 128 + signal.SIGTERM:
            assert run["recorded_status"] == "interrupted", run
    if state == "old" and code != 0:
        assert all(r["status"] != "done" for r in new_runs)
    # The next writer removes what the killed one left beside the folder, and keeps the folder.
    RunFolder(out, kind=kind).close()
    assert not glob.glob(str(out.parent / f".{out.name}.staging-*")) and not glob.glob(str(out.parent / f".{out.name}.old-*"))
    assert snapshot(out) == now
    if state == "training":  # a QAT folder killed during training resumes to a finished run
        assert main(COMMANDS[kind](out, NEW_CAL[kind]) + ["--resume"]) == 0
        assert assert_complete_new(kind, out) == "done"
    return state, sig, code


@pytest.mark.integration
@pytest.mark.parametrize("kind,seed", [("calibrate", 14), ("compare", 14), ("qat", 11)])
def test_killed_run_leaves_the_old_or_the_new_folder(kind, seed, tmp_path, monkeypatch):
    kill_case(kind, seed, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 22))
@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_killed_run_many_seeds(kind, seed, tmp_path, monkeypatch):
    kill_case(kind, seed, tmp_path, monkeypatch)
