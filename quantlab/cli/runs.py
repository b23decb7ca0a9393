"""``quantlab runs``: list the runs in the run store, or show one."""
from __future__ import annotations

import argparse

from quantlab.cli._runs_common import add_store_arg, fmt, fmt_delta, open_store
from quantlab.cli.common import print_table


def register(sub) -> None:
    p = sub.add_parser("runs", help="list stored runs (or --show RUN_ID)")
    p.add_argument("--kind", default=None, help="only runs of this kind (compare, sensitivity, autoprecision, calibrate, qat, export)")
    p.add_argument("--limit", type=int, default=30, help="newest N runs (default 30)")
    p.add_argument("--show", metavar="RUN_ID", default=None, help="details of one run: config, results, artifacts")
    p.add_argument("--prune", action="store_true",
                   help="record 'interrupted' for runs still marked running whose process is gone (killed, crashed)")
    add_store_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    store = open_store(args)
    if args.prune:
        from quantlab.jobs.recorder import Recorder

        pruned = Recorder(store).prune()  # the recorder decides run records
        for run in pruned:
            print(f"{run['id']}: interrupted ({run['error']})")
        print(f"{len(pruned)} run(s) recorded as interrupted in {store.path}")
        return 0
    if args.show:
        run = store.get_run(args.show)
        for key in ("id", "kind", "status", "name", "model", "data", "eval_data", "run_dir", "parent_id", "created_at", "updated_at", "error"):
            if run.get(key) is not None:
                print(f"{key:11s} {run[key]}")
        if run.get("owner"):
            owner = run["owner"]
            note = "" if run["status"] == run["recorded_status"] else f" (gone; recorded {run['recorded_status']}: `quantlab runs --prune` records it)"
            print(f"{'owner':11s} pid {owner['pid']} on {owner['host']}{note}")
        if run.get("config"):
            print("config      " + json.dumps(run["config"], sort_keys=True))
        results = store.results(args.show)
        if results:
            from quantlab.cli._compare_tables import print_deployment, print_fidelity
            from quantlab.evaluation import present

            print_table(
                [[r["precision"], r["calibrator"] or "-", r["source"], r["metric"], fmt(r["value"]), fmt(r.get("n")),
                  "-" if r.get("ci_low") is None else f"{fmt(r['ci_low'])} – {fmt(r['ci_high'])}", fmt_delta(r["delta"]),
                  present.noise_verdict(r), fmt(r["seconds"], 3)] for r in results],
                ["precision", "calibrator", "source", "metric", "value", "n", "95% CI", "Δ vs FP32", "noise",
                 present.PYTORCH_SECONDS],
            )
            print_fidelity(store.fidelity(args.show))
            print_deployment(store.deployment(args.show))
        layers = store.layer_stats(args.show)
        if layers:
            print(f"{len(layers)} per-layer rows (quantlab report --run {run.get('run_dir') or args.show} draws them)")
        for artifact in store.artifacts(args.show):
            print(f"{artifact['kind']:12s} {artifact['path']}")
        return 0
    runs = store.list_runs(args.kind, limit=args.limit)
    if not runs:
        print(f"no runs in {store.path}" + (f" of kind {args.kind}" if args.kind else ""))
        return 0
    rows = []
    for r in runs:
        metric = (r.get("config") or {}).get("metric") or "-"
        rows.append([r["id"], r["kind"], r["status"] + (f" {100 * r['progress']:.0f}%" if r["status"] == "running" and r["progress"] else ""),
                     r["model"], metric, r["created_at"][:19].replace("T", " "), r.get("run_dir") or "-"])
    print_table(rows, ["run", "kind", "status", "model", "metric", "created (UTC)", "folder"])
    print(f"{len(runs)} run(s) in {store.path}")
    return 0
