"""``quantlab demo``: the whole workflow on the built-in Fashion-MNIST model, then the dashboard."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    from quantlab.cli.ui import add_server_args

    p = sub.add_parser("demo", help="calibrate, compare FP32/FP16/INT8, export Q/DQ ONNX on Fashion-MNIST; open the dashboard")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--no-ui", action="store_true", help="do not start the dashboard afterwards")
    p.add_argument("--eval-samples", type=int, default=None, help="Fashion-MNIST test images to score (default 2000)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration images (default 512)")
    add_server_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantlab.cli._progress import FractionProgress
    from quantlab.cli._compare_tables import print_accuracy, print_deployment, print_fidelity
    from quantlab.jobs.demo import run_demo
    from quantlab.jobs.demo_spec import demo_spec, validate
    from quantlab.store import RunStore

    if any(n is not None and n < 1 for n in (args.eval_samples, args.calib_samples)):
        raise ValueError("--eval-samples and --calib-samples must be >= 1")
    if not args.no_ui:
        from quantlab.cli.ui import check_host

        check_host(args.host, args.allow_remote_code)  # before the demo's work, not after
    store = RunStore(args.store)
    spec = validate(demo_spec(args.out, eval_samples=args.eval_samples, calib_samples=args.calib_samples))
    print(f"demo: {spec.model} · calibration {spec.calib_data} · eval {spec.eval_data}", flush=True)
    with FractionProgress("demo") as progress:  # stage lines and a bar on a terminal; nothing with --quiet or in a pipe
        outcome = run_demo(store, spec, progress=progress)
    metric = outcome["metric"]
    rows = [r for r in outcome["rows"] if r["metric"] == metric]
    # The same tables as `quantlab compare`: n, 95% CI and the paired test vs FP32, fidelity, deployment cost.
    print_accuracy(outcome["rows"], metric)
    print_fidelity(outcome.get("fidelity") or [])
    print_deployment(outcome.get("deployment") or [])
    best = outcome["best_calibrator"]
    int8 = [r for r in rows if r["precision"] == "int8" and r["calibrator"] == best]
    if int8:
        noise = ", within noise" if int8[0].get("within_noise") else ""
        print(f"best INT8: {_label(int8[0])} ({int8[0]['delta']:+.2f} points vs FP32{noise})")
    run_id = outcome["run_id"]
    print(f"run {run_id} recorded in {store.path}")
    print(f"run folder: {outcome['run_dir']}")
    for what, path in outcome["outputs"].items():
        print(f"  {what}: {path}")
    for note in outcome["skipped"]:
        print(f"  skipped: {note}")
    if args.no_ui:
        print(f"open the dashboard with: quantlab ui --store {store.path}")
        return 0
    from quantlab.cli.ui import serve

    return serve(str(store.path), args.port, args.host, allow_remote_code=args.allow_remote_code)


def _label(row) -> str:
    """``FP32``, ``FP16``, ``INT8 entropy``: the row's configuration as the dashboard names it."""
    return row["precision"].upper() + (f" {row['calibrator']}" if row.get("calibrator") else "")
