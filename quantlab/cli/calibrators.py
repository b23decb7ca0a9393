"""``quantlab calibrators``: list the registered calibrators."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("calibrators", help="list registered calibrators")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.calibrators import get_calibrator, list_calibrators

    for name in list_calibrators():
        doc = (get_calibrator(name).__doc__ or "").strip().splitlines()
        print(f"{name:12s} {doc[0] if doc else ''}")
    return 0
