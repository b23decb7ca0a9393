"""Run folders: committed as a whole, one writer at a time, leftovers of killed writers repaired."""
import os
import signal
import subprocess
import sys
import time

import pytest

import quantlab.store.runfolder as runfolder
from quantlab.errors import OutputPathError
from quantlab.store import MANIFEST_FILE, RunFolder, RunLock, RunLockedError, read_manifest
from quantlab.store.lock import is_locked, lock_path


def _write(folder, files):
    with RunFolder(folder, kind="calibrate") as rf:
        stage = rf.stage()
        for name, text in files.items():
            (stage / name).write_text(text)
        before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
        assert before is None or set(files) - {"run.json"} - set(before)  # nothing new visible before the commit
        rf.commit()


def test_commit_replaces_the_folder_as_a_whole(tmp_path):
    folder = tmp_path / "run"
    _write(folder, {"run.json": "{}", "scales.max.json": "A"})
    manifest = read_manifest(folder)
    assert manifest["files"] == ["run.json", "scales.max.json"] and manifest["owner"]["pid"] == os.getpid()
    _write(folder, {"run.json": "{}", "scales.mse.json": "B"})
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST_FILE, "run.json", "scales.mse.json"])  # no stale max
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]  # no stage, no old folder


def test_an_exception_before_commit_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "run"
    _write(folder, {"run.json": "{}", "scales.max.json": "A"})
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(folder, kind="calibrate") as rf:
            (rf.stage() / "scales.max.json").write_text("half")
            raise KeyboardInterrupt
    assert (folder / "scales.max.json").read_text() == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]


def test_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "_exchange", lambda a, b: False)
    folder = tmp_path / "run"
    _write(folder, {"run.json": "{}", "a.json": "A"})
    _write(folder, {"run.json": "{}", "b.json": "B"})
    assert (folder / "b.json").read_text() == "B" and not (folder / "a.json").exists()


def test_leftovers_of_a_killed_writer_are_repaired_by_the_next(tmp_path):
    folder = tmp_path / "run"
    _write(folder, {"run.json": "{}", "a.json": "A"})
    # Killed between the two renames of the fallback swap: the folder is at .run.old-*.
    os.rename(folder, tmp_path / ".run.old-1-abc")
    (tmp_path / ".run.staging-2-def").mkdir()
    RunFolder(folder, kind="calibrate").close()
    assert (folder / "a.json").read_text() == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "run"]


def test_base_current_links_the_committed_files(tmp_path):
    folder = tmp_path / "run"
    _write(folder, {"run.json": "{}", "checkpoint.pt": "ckpt"})
    with RunFolder(folder, kind="qat") as rf:
        stage = rf.stage(base="current")
        assert (stage / "checkpoint.pt").read_text() == "ckpt" and not (stage / MANIFEST_FILE).exists()
        assert os.path.samefile(stage / "checkpoint.pt", folder / "checkpoint.pt")  # a link, not a copy
        (stage / "model.pt").write_text("final")
        assert not (folder / "model.pt").exists()
        assert rf.final(stage / "model.pt") == folder / "model.pt"
        rf.commit(state="done")
    assert (folder / "model.pt").read_text() == "final" and read_manifest(folder)["state"] == "done"


def test_a_second_writer_is_refused_until_the_first_dies(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from quantlab.store import RunLock; "
         f"lock = RunLock({str(folder)!r}, 'quantlab compare'); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_locked(folder)
        with pytest.raises(RunLockedError, match=rf"being written by quantlab compare \(pid {holder.pid} on"):
            RunFolder(folder, kind="compare")
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while is_locked(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        RunFolder(folder, kind="compare").close()
    finally:
        holder.kill()
        holder.wait()


def test_one_process_cannot_hold_two_writers(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder, "first"):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(folder, "second")
    assert lock_path(folder) == tmp_path / ".run.lock"


def test_only_quantlab_folders_are_replaced(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "model.py").write_text("x")
    with pytest.raises(OutputPathError, match="quantlab did not write"):
        RunFolder(project, kind="compare")
    legacy = tmp_path / "legacy"  # written by an older quantlab (no manifest): replaceable
    legacy.mkdir()
    (legacy / "run.json").write_text("{}")
    (legacy / "scales.max.json").write_text("{}")
    (legacy / "autoprecision.max").mkdir()
    RunFolder(legacy, kind="compare").close()
    with pytest.raises(OutputPathError, match="already holds a run"):
        RunFolder(legacy, kind="compare", replace=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        RunFolder(tmp_path / "f", kind="compare")
