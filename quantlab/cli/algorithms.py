"""``quantlab algorithms``: list the registered PTQ algorithms (transforms and refiners)."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("algorithms", help="list registered PTQ algorithms (use with --algorithms)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.algorithms import describe_params, get_algorithm, list_algorithms
    from quantlab.cli.common import print_table

    names = list_algorithms()
    if not names:
        print("no PTQ algorithms registered")
        return 0
    rows = []
    for name in names:
        algorithm = get_algorithm(name)
        rows.append([name, algorithm.stage.value, "yes" if algorithm.needs_data else "no", describe_params(algorithm),
                     algorithm.description])
    print_table(rows, ["algorithm", "stage", "needs data", "parameters (defaults)", "description"])
    print("pipeline order: transforms, then refiners, as listed; e.g. --algorithms "
          + ",".join(names[:3]) + (" --algorithm-param NAME.KEY=VALUE" if names else ""))
    return 0
