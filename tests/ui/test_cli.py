"""``quantlab demo`` and ``quantlab ui`` (the server itself is started by the browser test)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from quantlab.cli.main import main
from quantlab.cli.ui import app_path, streamlit_command
from quantlab.store import RunStore


def test_demo_prints_where_everything_was_written(demo_run):
    text = demo_run["stdout"]
    assert f"recorded in {demo_run['store']}" in text
    assert f"run folder: {demo_run['out']}" in text
    written = dict(re.findall(r"^  ([a-z_ ()]+): (/\S+)$", text, flags=re.M))
    for what in ("onnx", "check", "calibration_cache", "report", "results", "scales (max)"):
        assert what in written, f"demo did not report {what}: {text}"
        assert Path(written[what]).is_file(), written[what]
    # The printed table holds the stored numbers.
    run_id = demo_run["run"]["id"]
    fp32 = next(r["value"] for r in RunStore(demo_run["store"]).results(run_id) if r["precision"] == "fp32" and r["metric"] == "top1")
    line = next(line for line in text.splitlines() if line.startswith("| FP32 "))  # the accuracy table's first row
    cells = [c.strip() for c in line.strip("|").split("|")]  # configuration, n, top1 (%), 95% CI, ...
    assert int(cells[1]) == 300 and float(cells[2]) == pytest.approx(fp32, abs=0.005)
    assert "within noise" in text and "Deployment cost of the exported ONNX files" in text


def test_demo_records_children_and_artifacts(demo_run):
    store = RunStore(demo_run["store"])
    run = store.get_run(demo_run["run"]["id"])
    assert run["status"] == "done" and run["progress"] == 1.0
    children = [r for r in store.list_runs() if r["parent_id"] == run["id"]]
    assert sorted(r["kind"] for r in children) == ["export", "sensitivity"]
    assert all(r["status"] == "done" for r in children)
    kinds = {a["kind"] for r in [run] + children for a in store.artifacts(r["id"])}
    assert {"scales", "results", "report", "onnx", "check", "calibration_cache", "sensitivity"} <= kinds


def test_ui_command_runs_streamlit_on_the_packaged_app():
    assert app_path().is_file() and app_path().name == "app.py"
    cmd = streamlit_command(8601, "127.0.0.1")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(app_path())
    assert cmd[cmd.index("--server.port") + 1] == "8601"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"


def test_ui_rejects_a_store_that_is_not_sqlite(tmp_path, capsys):
    bad = tmp_path / "not-a-store.sqlite"
    bad.write_text("hello")
    assert main(["ui", "--store", str(bad), "--port", "8599"]) == 1
    assert "not an SQLite database" in capsys.readouterr().err


def test_ui_rejects_a_bad_port(tmp_path, capsys):
    assert main(["ui", "--store", str(tmp_path / "s.sqlite"), "--port", "70000"]) == 1
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ui", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "--store" in capsys.readouterr().out
