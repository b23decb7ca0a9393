"""Helpers shared by compare, sensitivity, autoprecision, runs and report (not a sub-command)."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Dict, Optional

from quantlab.cli._progress import StageProgress  # noqa: F401 - compare, sensitivity and autoprecision draw with it


def add_store_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="run store file (default $QUANTLAB_STORE, else ./.quantlab/runs.sqlite)")


def open_store(args: argparse.Namespace, *, run_info: Optional[Dict[str, Any]] = None):
    """The store named by --store, else the one the run folder recorded, else the default."""
    from quantlab.store import STORE_ENV, RunStore
    import os

    if args.store:
        return RunStore(args.store)
    if run_info and run_info.get("store") and not os.environ.get(STORE_ENV):
        return RunStore(run_info["store"])
    return RunStore()


def check_trust(info: Dict[str, Any], store, trust: bool) -> None:
    """Before any code of a recorded run is imported: refuse someone else's code unless --trust (then say so)."""
    from quantlab.trust import require_trusted

    for reason in require_trusted(info, trust=trust, run_dir=info.get("run_dir"), store_path=store.path):
        print(f"warning: running code of a run that is not clearly yours (--trust): {reason}", file=sys.stderr)


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a compare run: its folder (with run.json) or its run id")


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def fmt_delta(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:+.3g}" if value != 0 else "0"
