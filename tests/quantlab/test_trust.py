"""Class 6 of issue 15: code of someone else's run is never run unasked; a remote dashboard needs consent."""
import json
import os

import pytest

from quantlab.cli.main import main
from quantlab.cli.ui import check_host, is_loopback
from quantlab.trust import UntrustedRunError, foreign_reasons, require_trusted


@pytest.fixture
def recorded_run(tmp_path):
    """A compare run folder whose model file leaves a mark when imported."""
    marker = tmp_path / "imported"
    model = tmp_path / "model.py"
    model.write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom tests.qat.models import tiny_cnn as build\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"kind": "compare", "model": f"{model}:build", "eval_data": "fmnist:test[:32]",
                                                "metric": "top1", "calibrators": ["max"], "batch_size": 32}))
    (folder / "results.json").write_text(json.dumps({"best_calibrator": "max", "rows": []}))
    return {"folder": folder, "model": model, "marker": marker}


def test_own_runs_are_trusted(recorded_run):
    info = json.loads((recorded_run["folder"] / "run.json").read_text())
    assert foreign_reasons(info, run_dir=recorded_run["folder"]) == []


def test_someone_elses_run_is_refused_before_its_code_runs(recorded_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "getuid", lambda: os.stat(recorded_run["model"]).st_uid + 4242)  # we are another user now
    args = ["sensitivity", "--run", str(recorded_run["folder"]), "--store", str(tmp_path / "runs.sqlite")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not clearly yours" in err and "the model file" in err and "--trust" in err
    assert not recorded_run["marker"].exists()  # nothing of the file ran
    info = json.loads((recorded_run["folder"] / "run.json").read_text())
    reasons = require_trusted(info, trust=True, run_dir=recorded_run["folder"])  # --trust: proceed, with the reasons
    assert any("run.json" in r for r in reasons) and any("model file" in r for r in reasons)


def test_a_model_file_others_can_write_is_not_trusted(recorded_run):
    os.chmod(recorded_run["model"], 0o666)
    info = json.loads((recorded_run["folder"] / "run.json").read_text())
    with pytest.raises(UntrustedRunError, match="writable by other users"):
        require_trusted(info, trust=False, run_dir=recorded_run["folder"])


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.3.4.5", True),
                                            ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("myhost", False)])
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_remote_dashboard_needs_explicit_consent(tmp_path, capsys):
    assert main(["ui", "--store", str(tmp_path / "runs.sqlite"), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "New run" in err and "--allow-remote-code" in err
    assert main(["demo", "--store", str(tmp_path / "runs.sqlite"), "--host", "0.0.0.0", "--out", str(tmp_path / "d")]) == 1
    assert "--allow-remote-code" in capsys.readouterr().err and not (tmp_path / "d").exists()  # refused before the demo's work
    check_host("0.0.0.0", allow_remote_code=True)  # consent given: allowed


def test_new_run_page_warns_when_served_beyond_this_machine(empty_store, monkeypatch):
    from tests.ui.helpers import no_exceptions, open_page

    monkeypatch.setenv("QUANTLAB_UI_REMOTE_HOST", "0.0.0.0")
    at = open_page("new_run")
    no_exceptions(at)
    assert any("0.0.0.0" in w.value and "runs that Python file" in w.value for w in at.warning)


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    from quantlab.store import STORE_ENV, RunStore

    path = tmp_path / "store" / "runs.sqlite"
    RunStore(path)
    monkeypatch.setenv(STORE_ENV, str(path))
    monkeypatch.chdir(tmp_path)
    return path
