"""``quantlab ui``: the Streamlit dashboard on a run store."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional


#: Set for the dashboard process when it listens beyond this machine (pages warn about it).
REMOTE_ENV = "QUANTLAB_UI_REMOTE_HOST"


def register(sub) -> None:
    p = sub.add_parser("ui", help="open the dashboard (Streamlit) on a run store")
    add_server_args(p)
    p.set_defaults(func=run)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="run store file (default $QUANTLAB_STORE, else ./.quantlab/runs.sqlite)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--allow-remote-code", action="store_true",
                        help="allow a --host other machines can reach: anyone who opens the page can make this machine run "
                             "a Python file they name (New run), as you")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_host(host: str, allow_remote_code: bool) -> None:
    """Refuses a non-loopback address unless the user accepted what it means."""
    if not is_loopback(host) and not allow_remote_code:
        raise ValueError(
            f"--host {host} lets other machines open the dashboard, and its New run page imports and runs a Python "
            "file that the visitor names (the model factory), as you. Serve on 127.0.0.1 and reach it through an SSH "
            "tunnel, or pass --allow-remote-code if everyone who can reach this address may run code here"
        )


def app_path() -> Path:
    """The dashboard's Streamlit script (``quantlab/ui/app.py`` of the installed package)."""
    import quantlab.ui

    return Path(quantlab.ui.__file__).resolve().parent / "app.py"


def streamlit_command(port: int, host: str) -> List[str]:
    """``python -m streamlit run <app.py>`` with quantlab's server settings."""
    return [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.port", str(port),
        "--server.address", host,
        "--server.headless", "true",
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal",
        "--theme.primaryColor", "#1f3b73",
    ]


def serve(store: Optional[str], port: int, host: str, *, announce: bool = True, allow_remote_code: bool = False) -> int:
    """Starts the dashboard and waits for it (Ctrl-C stops it).

    Raises:
        ValueError: a bad port, or a non-loopback ``host`` without ``allow_remote_code``.
    """
    from quantlab.store import STORE_ENV, RunStore

    if not 0 < port < 65536:
        raise ValueError(f"--port must be within 1..65535, got {port}")
    check_host(host, allow_remote_code)
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise ImportError("the dashboard needs Streamlit: pip install 'quantlab[ui]'") from None
    path = RunStore(store).path  # opens (or creates) it now: a bad store is an error here, not in the browser
    env = dict(os.environ, **{STORE_ENV: str(path)})
    if not is_loopback(host):
        env[REMOTE_ENV] = host  # the New run page shows who can make this machine run code
    if announce:
        print(f"quantlab dashboard: http://{host}:{port}  (run store {path}; Ctrl-C stops it)", flush=True)
        if not is_loopback(host):
            print(f"warning: listening on {host}: whoever reaches it can run Python files on this machine as you (New run)",
                  file=sys.stderr, flush=True)
    proc = subprocess.Popen(streamlit_command(port, host), env=env)

    def stop(signum, frame):  # SIGTERM (e.g. a service manager) stops the server like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    return serve(args.store, args.port, args.host, allow_remote_code=args.allow_remote_code)
