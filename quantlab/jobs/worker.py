"""Demo jobs in the background (the dashboard's): one worker process per run, followed through the run store.

    run_id = start_job(spec, store_path)      # validates, records the run, starts the worker
    python -m quantlab.jobs.worker --store PATH RUN_ID   # the worker (what start_job runs)

The worker is a separate process in its own session: it keeps running when
the browser tab is refreshed or closed (and even when the dashboard server
stops). It writes its progress into the run store and its stage into
``<run folder>/job.json``; the page only reads those, so any page load, by
anyone, shows the same progress bar.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from quantlab.jobs.demo import description, read_job_file, run_demo
from quantlab.jobs.demo_spec import JobSpec, validate
from quantlab.jobs.recorder import Recorder

LOG_FILE = "job.log"
_children: List[subprocess.Popen] = []


def create_job_run(store: Any, spec: JobSpec) -> str:
    """Records the demo run of a validated spec before its worker starts (status running, progress 0)."""
    return Recorder(store).create(description(spec))


def _reap(proc: subprocess.Popen) -> None:
    proc.wait()  # a finished worker must not linger as a zombie (its pid would look alive)


def start_job(spec: JobSpec, store_path: "str | os.PathLike[str]") -> str:
    """Validates ``spec``, records its run and starts the worker process; returns the run id.

    Raises:
        JobInputError: bad model/data/metric/options, before anything is recorded.
    """
    from quantlab.store import STORE_ENV, RunStore

    spec = validate(spec)
    store = RunStore(store_path)
    run_id = create_job_run(store, spec)
    run_dir = Path(spec.out_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / LOG_FILE, "ab")
        env = dict(os.environ, **{STORE_ENV: str(store.path)})
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "quantlab.jobs.worker", "--store", str(store.path), run_id],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=os.getcwd(), env=env, start_new_session=True,
        )
        log.close()
    except OSError as exc:
        Recorder(store).fail(run_id, f"could not start the worker: {exc}")
        raise
    _children.append(proc)
    threading.Thread(target=_reap, args=(proc,), daemon=True, name=f"reap-{run_id}").start()
    return run_id


def worker_alive(pid: Optional[int]) -> Optional[bool]:
    """Whether the worker process is alive (None when unknown)."""
    if not pid:
        return None
    for proc in _children:
        if proc.pid == pid:
            return proc.poll() is None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return None
    return True


def job_state(run: Dict[str, Any]) -> Dict[str, Any]:
    """What the page shows for a run: status, progress, stage, and whether its worker died."""
    info = read_job_file(run.get("run_dir"))
    state = {
        "status": run["status"], "progress": float(run.get("progress") or 0.0), "stage": info.get("stage") or "",
        "error": run.get("error"), "pid": info.get("pid"), "skipped": info.get("skipped") or [], "lost": False,
        "log": str(Path(run["run_dir"]) / LOG_FILE) if run.get("run_dir") else None,
    }
    if run["status"] == "running" and info.get("pid") and worker_alive(info.get("pid")) is False:
        state["lost"] = True  # the worker was killed without recording a failure
    return state


def run_worker(store_path: str, run_id: str) -> None:
    """The worker: runs the job recorded as ``run_id`` (its spec is the run's config).

    Raises:
        Whatever the job raised, after it was recorded as the run's error.
    """
    from quantlab.store import RunStore

    store = RunStore(store_path)
    run = store.get_run(run_id)
    try:
        spec = JobSpec.from_dict((run.get("config") or {}).get("job") or {})
    except Exception as exc:  # noqa: BLE001 - a run not made by the dashboard: record why, do not hang "running"
        Recorder(store).fail(run_id, f"run {run_id} holds no dashboard job spec ({exc})")
        raise
    run_demo(store, spec, run_id=run_id)  # the recorder adopts the run: this worker becomes its owner (store.claim)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantlab.jobs.worker", description="run one dashboard job")
    parser.add_argument("--store", required=True)
    parser.add_argument("run_id")
    args = parser.parse_args(argv)
    from quantlab.interrupts import terminate_as_interrupt

    try:
        with terminate_as_interrupt():  # SIGTERM records the run interrupted instead of leaving it running
            run_worker(args.store, args.run_id)
    except BaseException:  # noqa: BLE001 - already recorded in the store; the job log keeps the traceback
        import traceback

        traceback.print_exc()
        print(f"job {args.run_id} failed", file=sys.stderr)
        return 1
    print(f"job {args.run_id} done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
