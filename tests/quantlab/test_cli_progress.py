"""CLI progress: stage messages and a bar on a terminal (a real pseudo-terminal), nothing in a pipe or with --quiet."""
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "tests/qat/models.py:tiny_cnn"
# tqdm's bar: "statistics:  33%|███▎      | 1/3 [...]"
BAR = re.compile(r"statistics: +\d+%\|.*\| *\d+/3")


def _env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "QUANTLAB_STORE": str(tmp_path / "runs.sqlite"),
            "COLUMNS": "120", "TERM": "xterm"}


def _calibrate(out):
    return ["calibrate", "--model", MODEL, "--data", "fmnist:calib[:192]", "--batch-size", "64", "--device", "cpu",
            "--calibrators", "max", "--out", str(out)]


def run_on_terminal(args, tmp_path):
    """Runs ``quantlab ARGS`` with stderr (and stdin) on a pseudo-terminal, stdout on a pipe.

    Returns (exit code, stdout text, what the terminal received).
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "quantlab", *args], stdin=slave, stdout=subprocess.PIPE, stderr=slave,
                            env=_env(tmp_path), cwd=REPO)
    os.close(slave)
    out = {}
    reader = threading.Thread(target=lambda: out.setdefault("stdout", proc.stdout.read()))
    reader.start()
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=300)
    reader.join(timeout=60)
    return code, out["stdout"].decode(), b"".join(chunks).decode("utf-8", "replace")


def test_terminal_gets_stage_messages_and_a_bar(tmp_path):
    code, stdout, terminal = run_on_terminal(_calibrate(tmp_path / "cal"), tmp_path)
    assert code == 0, terminal
    assert "quantlab calibrate: loading model and data" in terminal
    assert "quantlab calibrate: statistics" in terminal
    assert BAR.search(terminal), terminal
    # The results stay on stdout, never mixed into the terminal's progress.
    assert "statistics pass: 3 batches" in stdout and "statistics pass:" not in terminal


def test_job_stages_reach_the_terminal(tmp_path):
    """run_export's progress(stage, done, total) calls, drawn by the CLI's renderer."""
    out = tmp_path / "model.fp16.onnx"
    code, stdout, terminal = run_on_terminal(
        ["export", "--model", MODEL, "--precision", "fp16", "--input-shape", "1,28,28", "--out", str(out)], tmp_path)
    assert code == 0, terminal
    assert "quantlab export: loading model and example inputs" in terminal
    assert "quantlab export: exporting FP16 ONNX" in terminal
    assert f"wrote {out}" in stdout and out.is_file()


def test_quiet_terminal_gets_nothing(tmp_path):
    code, stdout, terminal = run_on_terminal(_calibrate(tmp_path / "cal") + ["--quiet"], tmp_path)
    assert code == 0
    assert terminal.strip() == "", terminal
    assert "statistics pass: 3 batches" in stdout


def test_quiet_before_the_command_too(tmp_path):
    code, _stdout, terminal = run_on_terminal(["--quiet"] + _calibrate(tmp_path / "cal"), tmp_path)
    assert code == 0 and terminal.strip() == "", terminal


def test_quiet_still_reports_errors(tmp_path):
    args = _calibrate(tmp_path / "cal") + ["--quiet"]
    args[args.index("--calibrators") + 1] = "nosuch"
    code, _stdout, terminal = run_on_terminal(args, tmp_path)
    assert code == 1
    assert "quantlab calibrate: error:" in terminal and "nosuch" in terminal


def test_not_a_terminal_gets_no_progress(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "quantlab", *_calibrate(tmp_path / "cal")], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "quantlab calibrate:" not in proc.stderr and "%|" not in proc.stderr, proc.stderr
    assert "statistics pass: 3 batches" in proc.stdout


@pytest.mark.parametrize("command", ["demo", "calibrate", "compare", "sensitivity", "autoprecision", "qat", "export",
                                     "run", "prune", "check", "runs"])
def test_every_command_takes_quiet(command):
    from quantlab.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert any("--quiet" in a.option_strings for a in sub._actions)
