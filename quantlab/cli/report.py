"""``quantlab report``: a self-contained HTML (or Markdown) report of a compare run."""
from __future__ import annotations

import argparse

from quantlab.cli._runs_common import add_run_arg, add_store_arg, open_store


def register(sub) -> None:
    p = sub.add_parser("report", help="write an HTML or Markdown report of a compare run (table, SQNR chart, histograms)")
    add_run_arg(p)
    p.add_argument("--format", choices=("html", "md"), default="html", help="html (one self-contained file) or md (default html)")
    p.add_argument("--out", default=None, help="report file (default <run>/report.html or report.md)")
    add_store_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.jobs.report import run_report
    from quantlab.jobs.runs import load_run_info

    info = load_run_info(args.run, args.store)
    store = open_store(args, run_info=info) if info.get("run_id") else None
    path = run_report(info, store, out=args.out, fmt=args.format)
    print(f"report: {path}")
    return 0
